"""2-process DDP: our trainer against a hand-written DDP loop on the same work (gloo, CPU).

    torchrun --nproc_per_node 2 -m benchmarks.ddp --variant ours|torch --steps 400

Rank 0 prints {"variant", "loop_s"}. Workload: digits, MLP 64-256-256-10, AdamW, global batch 64.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time


def run_torch(steps: int) -> float:
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F
    from torch.nn.parallel import DistributedDataParallel as DDP
    from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

    from benchmarks.overhead import build_model, data

    dist.init_process_group("gloo")
    torch.manual_seed(0)
    x, y = data()
    model = DDP(build_model("mlp"))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ds = TensorDataset(x, y)
    sampler = DistributedSampler(ds, shuffle=True, drop_last=True)
    loader = DataLoader(ds, batch_size=64 // dist.get_world_size(), sampler=sampler, drop_last=True)
    step, epoch, t0 = 0, 0, time.perf_counter()
    while step < steps:
        sampler.set_epoch(epoch)
        for xb, yb in loader:
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(xb), yb).backward()
            opt.step()
            step += 1
            if step == steps:
                break
        epoch += 1
    elapsed = time.perf_counter() - t0
    dist.barrier()
    dist.destroy_process_group()
    return elapsed


def run_ours(steps: int) -> float:
    import yaml

    from src.run.experiment import build, prepare

    tmp = tempfile.mkdtemp()
    cfg = {
        "name": "bench_ddp",
        "data": {"type": "digits", "val_fraction": 0.0, "batch_size": 64},
        "model": {"type": "mlp", "hidden": [256, 256]},
        "task": {"type": "classification", "top_k": [], "train_accuracy": False},
        "optimizer": {"type": "adamw", "lr": 1e-3},
        "trainer": {"max_steps": steps, "log_every": 50, "eval_every_n_epochs": None},
        "strategy": {"type": "ddp"},
        "checkpoint": {"save_last": False, "resume": "never"},
        "logging": {"loggers": ["jsonl"], "root": tmp},
    }
    path = os.path.join(tmp, "c.yaml")
    with open(path, "w") as f:
        yaml.safe_dump(cfg, f)
    c, o = prepare(path)
    exp = build(c, o)
    t0 = time.perf_counter()
    exp.run()
    elapsed = time.perf_counter() - t0
    exp.strategy.teardown()
    return elapsed


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--variant", choices=["ours", "torch"], required=True)
    p.add_argument("--steps", type=int, default=400)
    args = p.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    loop_s = (run_ours if args.variant == "ours" else run_torch)(args.steps)
    if int(os.environ.get("RANK", 0)) == 0:
        print(json.dumps({"variant": args.variant, "loop_s": loop_s}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
