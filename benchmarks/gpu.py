"""Checks of the GPU paths that a CPU cannot exercise, each a short run of the real command line:

    python -m benchmarks.gpu                 # on a machine with CUDA GPUs
    python -m benchmarks.gpu --device cpu    # the same runs on the CPU (gloo, DeepSpeed's CPU
                                             # accelerator): checks this script, not the GPU paths

Each check trains the default CNN on digits for a few steps with one setting that only a GPU
takes through its own code (DeepSpeed's bf16 casts and gradient norm on the device, FSDP's CPU
offload with its gloo group beside NCCL, background checkpoints on ranks >= 1, deterministic
kernels, MFU, compile after wrapping, SyncBatchNorm) and reports ok or the last line of its error. Exit code 1
when a check fails.
"""
from __future__ import annotations

import argparse
import json
import math
import re
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIG = str(ROOT / "configs/exp001.yaml")
SHORT = ["trainer.max_steps=4", "trainer.log_every=2", "trainer.eval_every_n_epochs=null",
         "trainer.eval_every_n_steps=4", "checkpoint.every_n_steps=2"]


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(launcher: str, nproc: int, overrides: list[str], root: Path, env: dict):
    """Run the CLI under ``launcher`` (python | torchrun | deepspeed); (returncode, stderr)."""
    if launcher == "python":
        cmd = [sys.executable, "-m", "src.main"]
    elif launcher == "torchrun":
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
               f"--master_port={_port()}", "-m", "src.main"]
    else:
        cmd = [sys.executable, "-m", "deepspeed.launcher.runner", f"--num_gpus={nproc}",
               f"--master_port={_port()}", "--module", "src.main"]
    out = subprocess.run(cmd + ["--config", CONFIG, *SHORT, f"logging.root={root}", *overrides],
                         cwd=ROOT, env={**os.environ, **env, "PYTHONPATH": os.pathsep.join(
                             [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])},
                         capture_output=True, text=True, timeout=900)
    return out.returncode, out.stderr


def _cause(stderr: str) -> list[str]:
    """The line of a failed run's stderr that names the error (not torchrun's banner rules)."""
    lines = [ln.strip() for ln in stderr.splitlines()]
    lines = [ln for ln in lines if ln.strip("=-") and not ln.lower().startswith("traceback")]
    named = [ln for ln in lines if "ChildFailedError" not in ln and (
        ln.startswith("error:") or re.search(r"\w+(Error|Exception):", ln))]
    return (named or lines)[-1:]


def rows(root: Path, name: str) -> list[dict]:
    path = root / name / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def checks(gpus: int, cpu: bool) -> dict[str, tuple[str, int, list[str], callable]]:
    """name -> (launcher, processes, overrides, verdict on the run's metrics rows)."""
    ranks = max(1, min(gpus, 2))
    ds = "strategy.type=deepspeed"

    def finite_norms(r):
        norms = [x["train/grad_norm"] for x in r if "train/grad_norm" in x]
        return bool(norms) and all(math.isfinite(n) for n in norms)

    found = {
        "deterministic_cnn": ("python", 1, ["trainer.deterministic=true"], lambda r: bool(r)),
        "deepspeed_bf16_cnn": ("deepspeed", ranks, [ds, "trainer.precision=bf16",
                               "strategy.config={zero_optimization: {stage: 2}}"], finite_norms),
        "deepspeed_zero0_grad_norm": ("deepspeed", ranks, [ds, "strategy.config={}"],
                                      finite_norms),
        "fsdp_async_checkpoint": ("torchrun", ranks, ["strategy.type=fsdp",
                                  "checkpoint.async_save=true"], lambda r: bool(r)),
        "fp16_grad_scaler": ("python", 1, ["trainer.precision=fp16"], finite_norms),
        "ddp_compiled": ("torchrun", ranks, ["strategy.type=ddp", "trainer.compile=true"],
                         lambda r: bool(r)),
        "ddp_sync_batchnorm": ("torchrun", ranks, ["strategy={type: ddp, sync_batchnorm: true}"],
                               finite_norms),
    }
    if not cpu:  # a CPU has no peak FLOP/s for utilisation, and nothing to offload from
        found["mfu_bf16"] = ("python", 1, ["trainer.precision=bf16"],
                             lambda r: any(0 < x.get("train/mfu", 0) < 1 for x in r))
        found["fsdp_cpu_offload_clipped"] = ("torchrun", ranks, [
            "strategy.type=fsdp", "strategy.cpu_offload=true", "trainer.grad_clip=1.0"],
            finite_norms)
    return found


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Short runs of the GPU-only code paths.")
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--only", default="", help="comma-separated check names")
    p.add_argument("--log", default="", help="folder for each check's stderr (kept for reading)")
    args = p.parse_args(argv)
    import torch

    cpu = args.device == "cpu"
    gpus = torch.cuda.device_count()
    if not cpu and gpus == 0:
        print("no CUDA device: nothing checked (use --device cpu to check this script)")
        return 0
    env = {"DS_ACCELERATOR": "cpu", "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"} \
        if cpu else {}
    todo = checks(gpus, cpu)
    if args.only:
        todo = {k: v for k, v in todo.items() if k in args.only.split(",")}
    failed = 0
    print(f"| check | {'cpu' if cpu else torch.cuda.get_device_name(0)} x {max(1, gpus)} |")
    print("|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for name, (launcher, nproc, overrides, verdict) in todo.items():
            rc, err = launch(launcher, nproc, overrides + [f"name={name}"], Path(tmp), env)
            ok = rc == 0 and verdict(rows(Path(tmp), name))
            if args.log:
                Path(args.log).mkdir(parents=True, exist_ok=True)
                (Path(args.log) / f"{name}.txt").write_text(err)
            last = _cause(err) or [f"exit {rc}"]
            print(f"| {name} | {'ok' if ok else 'FAILED: ' + last[0][-200:]} |", flush=True)
            failed += not ok
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
