"""Loop overhead: the same training job as a hand-written PyTorch loop, through our trainer,
through PyTorch Lightning and through the HF Trainer.

Workload: scikit-learn digits, an MLP 64-256-256-10 (or a small CNN, where compute dominates),
AdamW lr 1e-3, batch 64, 400 steps, fp32, CPU. One variant per process:

    python -m benchmarks.overhead --variant ours --model mlp --steps 400

prints one JSON line: {"variant", "model", "loop_s", "final_loss"}. ``loop_s`` times the training
loop only (model and data already built); the driver (benchmarks/run.py) times whole processes.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

STEPS, BATCH, LR = 400, 64, 1e-3


def data():
    import torch
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    return x, torch.tensor(d.target)


def build_model(kind: str):
    import torch
    from torch import nn

    if kind == "mlp":
        return nn.Sequential(
            nn.Flatten(),
            nn.Linear(64, 256),
            nn.ReLU(),
            nn.Linear(256, 256),
            nn.ReLU(),
            nn.Linear(256, 10),
        )
    from src.models.cnn import SmallCNN

    torch.manual_seed(0)
    return SmallCNN(1, 10, [32, 64, 128], 0.0)


def run_torch(kind: str, steps: int) -> tuple[float, float]:
    """What people write: DataLoader over a TensorDataset, shuffle, zero_grad/backward/step."""
    import torch
    import torch.nn.functional as F
    from torch.utils.data import DataLoader, TensorDataset

    torch.manual_seed(0)
    x, y = data()
    model = build_model(kind)
    opt = torch.optim.AdamW(model.parameters(), lr=LR)
    loader = DataLoader(TensorDataset(x, y), batch_size=BATCH, shuffle=True, drop_last=True)
    step, t0 = 0, time.perf_counter()
    while step < steps:
        for xb, yb in loader:
            opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(xb), yb)
            loss.backward()
            opt.step()
            step += 1
            if step == steps:
                break
    return time.perf_counter() - t0, loss.item()


def run_torch_fast(kind: str, steps: int) -> tuple[float, float]:
    """The fastest hand-written loop: batches gathered by tensor indexing, no DataLoader."""
    import torch
    import torch.nn.functional as F

    torch.manual_seed(0)
    x, y = data()
    model = build_model(kind)
    opt = torch.optim.AdamW(model.parameters(), lr=LR)
    step, t0 = 0, time.perf_counter()
    while step < steps:
        order = torch.randperm(len(y))
        for i in range(0, len(y) - BATCH + 1, BATCH):
            idx = order[i : i + BATCH]
            opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(x[idx]), y[idx])
            loss.backward()
            opt.step()
            step += 1
            if step == steps:
                break
    return time.perf_counter() - t0, loss.item()


def run_ours(kind: str, steps: int) -> tuple[float, float]:
    """Our trainer through the public API: jsonl every 50 steps, no progress bar, no checkpoints."""
    import yaml

    from src.run.experiment import build, prepare

    tmp = tempfile.mkdtemp()
    model = (
        {"type": "mlp", "hidden": [256, 256]}
        if kind == "mlp"
        else {"type": "cnn", "channels": [32, 64, 128], "dropout": 0.0}
    )
    cfg = {
        "name": "bench",
        "seed": 0,
        "data": {"type": "digits", "val_fraction": 0.0, "batch_size": BATCH},
        "model": model,
        "task": {"type": "classification", "top_k": [], "train_accuracy": False},
        "optimizer": {"type": "adamw", "lr": LR, "weight_decay": 0.01},
        "trainer": {"max_steps": steps, "log_every": 50, "eval_every_n_epochs": None},
        "checkpoint": {"save_last": False, "resume": "never"},
        "logging": {"loggers": ["jsonl"], "root": tmp},
    }
    path = os.path.join(tmp, "bench.yaml")
    with open(path, "w") as f:
        yaml.safe_dump(cfg, f)
    c, o = prepare(path)
    exp = build(c, o)
    t0 = time.perf_counter()
    out = exp.run()
    return time.perf_counter() - t0, out["train/loss"]


def run_lightning(kind: str, steps: int) -> tuple[float, float]:
    import lightning as L
    import torch
    import torch.nn.functional as F
    from torch.utils.data import DataLoader, TensorDataset

    class Module(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = build_model(kind)

        def training_step(self, batch, _):
            loss = F.cross_entropy(self.model(batch[0]), batch[1])
            self.log("train/loss", loss)
            return loss

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=LR)

    torch.manual_seed(0)
    x, y = data()
    loader = DataLoader(TensorDataset(x, y), batch_size=BATCH, shuffle=True, drop_last=True)
    trainer = L.Trainer(
        max_steps=steps,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=50,
    )
    module = Module()
    t0 = time.perf_counter()
    trainer.fit(module, loader)
    return time.perf_counter() - t0, float(trainer.callback_metrics["train/loss"])


def run_hf(kind: str, steps: int) -> tuple[float, float]:
    import torch
    import torch.nn.functional as F
    from transformers import Trainer, TrainingArguments

    class Wrapped(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = build_model(kind)

        def forward(self, pixel_values, labels):
            return {"loss": F.cross_entropy(self.model(pixel_values), labels)}

    class DS(torch.utils.data.Dataset):
        def __init__(self, x, y):
            self.x, self.y = x, y

        def __len__(self):
            return len(self.y)

        def __getitem__(self, i):
            return {"pixel_values": self.x[i], "labels": self.y[i]}

    torch.manual_seed(0)
    x, y = data()
    args = TrainingArguments(
        output_dir=tempfile.mkdtemp(),
        max_steps=steps,
        per_device_train_batch_size=BATCH,
        learning_rate=LR,
        lr_scheduler_type="constant",
        weight_decay=0.0,
        logging_steps=50,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        dataloader_drop_last=True,
        seed=0,
        max_grad_norm=0.0,
    )
    trainer = Trainer(model=Wrapped(), args=args, train_dataset=DS(x, y))
    t0 = time.perf_counter()
    out = trainer.train()
    return time.perf_counter() - t0, out.training_loss


VARIANTS = {
    "torch": run_torch,
    "torch_fast": run_torch_fast,
    "ours": run_ours,
    "lightning": run_lightning,
    "hf": run_hf,
}
OPTIONAL = {"lightning": "lightning", "hf": "transformers"}  # variant -> package it needs


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--variant", choices=sorted(VARIANTS), required=True)
    p.add_argument("--model", choices=["mlp", "cnn"], default="mlp")
    p.add_argument("--steps", type=int, default=STEPS)
    args = p.parse_args(argv)
    import torch

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "1")))
    loop_s, loss = VARIANTS[args.variant](args.model, args.steps)
    print(
        json.dumps(
            {"variant": args.variant, "model": args.model, "loop_s": loop_s, "final_loss": loss}
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
