"""Checks of the GPU paths that a CPU cannot exercise, each a short run of the real command line:

    python -m benchmarks.gpu                 # on a machine with CUDA GPUs
    python -m benchmarks.gpu --device cpu    # the same runs on the CPU (gloo, DeepSpeed's CPU
                                             # accelerator): checks this script, not the GPU paths

Each check trains for a few steps with one setting that only a GPU takes through its own code
(DeepSpeed's bf16 casts and gradient norm on the device, FSDP's CPU offload with its gloo group
beside NCCL, background checkpoints on ranks >= 1, deterministic kernels, MFU, compile after
wrapping, SyncBatchNorm, pinned host memory), the loss of bf16 autocast and of fp16 with a
GradScaler against fp32 (the default CNN on digits, 30 steps: the mean loss of the last 10 steps
within 5% + 0.02 of fp32's), and the throughput and MFU of a ~1.1B-parameter Llama-style decoder
(transformers' Llama from config: 16 layers, 2048 wide, sequence 2048) under FSDP2 on one GPU
with bf16 and activation checkpointing. It reports ok or the last line of its error, with the
figures each check reads. Exit code 1 when a check fails. On the CPU (``--device cpu``) the
decoder is a tiny one and MFU is against a nominal 1 TFLOP/s, and the precision checks use a
narrower CNN (channels 8, 16, 32: a CPU emulates fp16 convolutions): that checks the script.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIG = str(ROOT / "configs/exp001.yaml")
SHORT = [
    "trainer.max_steps=4",
    "trainer.log_every=2",
    "trainer.eval_every_n_epochs=null",
    "trainer.eval_every_n_steps=4",
    "checkpoint.every_n_steps=2",
]


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(
    launcher: str, nproc: int, overrides: list[str], root: Path, env: dict, config: str = CONFIG
):
    """Run the CLI under ``launcher`` (python | torchrun | deepspeed); (returncode, stderr)."""
    if launcher == "python":
        cmd = [sys.executable, "-m", "src.main"]
    elif launcher == "torchrun":
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            f"--nproc_per_node={nproc}",
            f"--master_port={_port()}",
            "-m",
            "src.main",
        ]
    else:
        cmd = [
            sys.executable,
            "-m",
            "deepspeed.launcher.runner",
            f"--num_gpus={nproc}",
            f"--master_port={_port()}",
            "--module",
            "src.main",
        ]
    out = subprocess.run(
        cmd + ["--config", config, *SHORT, f"logging.root={root}", *overrides],
        cwd=ROOT,
        env={
            **os.environ,
            **env,
            "PYTHONPATH": os.pathsep.join(
                [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]
            ),
        },
        capture_output=True,
        text=True,
        timeout=900,
    )
    return out.returncode, out.stderr


def _cause(stderr: str) -> list[str]:
    """The line of a failed run's stderr that names the error (not torchrun's banner rules)."""
    lines = [ln.strip() for ln in stderr.splitlines()]
    lines = [ln for ln in lines if ln.strip("=-") and not ln.lower().startswith("traceback")]
    named = [
        ln
        for ln in lines
        if "ChildFailedError" not in ln
        and (ln.startswith("error:") or re.search(r"\w+(Error|Exception):", ln))
    ]
    return (named or lines)[-1:]


def rows(root: Path, name: str) -> list[dict]:
    path = root / name / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def last_loss(r: list[dict], n: int = 10) -> float:
    """Mean training loss of the last ``n`` logged steps."""
    losses = [x["train/loss"] for x in r if "train/loss" in x][-n:]
    return sum(losses) / len(losses) if losses else math.nan


PARITY = [
    "trainer.max_steps=30",
    "trainer.log_every=1",
    "trainer.eval_every_n_steps=null",
    "checkpoint.every_n_steps=null",
]
LM = str(ROOT / "configs/lm_stdlib.yaml")


def decoder(cpu: bool) -> list[str]:
    """Overrides of lm_stdlib for a Llama-style decoder: ~1.1B parameters at sequence 2048 on a
    GPU, bf16, FSDP2 with activation checkpointing; a tiny one on the CPU."""
    if cpu:
        shape = dict(
            hidden_size=64,
            intermediate_size=172,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=4,
            max_position_embeddings=128,
        )
        rest = [
            "data.block_size=128",
            "data.batch_size=2",
            "trainer.peak_tflops=1.0",
            "data.max_files=20",
            "trainer.compile=false",
        ]
    else:
        shape = dict(
            hidden_size=2048,
            intermediate_size=5632,
            num_hidden_layers=16,
            num_attention_heads=16,
            num_key_value_heads=16,
            max_position_embeddings=2048,
        )
        rest = [
            "data.block_size=2048",
            "data.batch_size=4",
            "trainer.precision=bf16",
            "data.pin_memory=true",
        ]
    config = ", ".join(f"{k}: {v}" for k, v in {"model_type": "llama", **shape}.items())
    return [
        f"model.config={{{config}}}",
        "strategy={type: fsdp, activation_checkpointing: true}",
        "trainer.max_steps=12",
        "trainer.log_every=4",
        "trainer.eval_every_n_steps=null",
        "checkpoint.every_n_steps=null",
        "checkpoint.save_last=false",
        "task.samples=0",
        *rest,
    ]


def checks(gpus: int, cpu: bool) -> dict[str, tuple]:
    """name -> (launcher, processes, overrides, verdict, config). A verdict takes the run's
    metrics rows and ``rows_of(name)`` (another check's) and returns ok or (ok, figures)."""
    ranks = max(1, min(gpus, 2))
    ds = "strategy.type=deepspeed"
    # a CPU emulates fp16 convolutions (30 s for exp001's CNN): it compares a narrower one
    parity = PARITY + (["model.channels=[8,16,32]"] if cpu else [])

    def finite_norms(r, _):
        norms = [x["train/grad_norm"] for x in r if "train/grad_norm" in x]
        return bool(norms) and all(math.isfinite(n) for n in norms)

    def ran(r, _):
        return bool(r)

    def same_loss(r, rows_of):
        ours, ref = last_loss(r), last_loss(rows_of("fp32_reference"))
        ok = abs(ours - ref) <= 0.05 * ref + 0.02
        return ok, f"loss {ours:.4f} vs fp32 {ref:.4f}"

    def throughput(r, _):
        last = [x for x in r if "train/tokens_per_sec" in x][-1:]
        if not last:
            return False, "no throughput logged"
        tps, mfu = last[0]["train/tokens_per_sec"], last[0].get("train/mfu", 0.0)
        return 0 < mfu < 1, f"{tps:,.0f} tokens/s, MFU {mfu:.1%}"

    found = {
        "deterministic_cnn": ("python", 1, ["trainer.deterministic=true"], ran),
        "deepspeed_bf16_cnn": (
            "deepspeed",
            ranks,
            [ds, "trainer.precision=bf16", "strategy.config={zero_optimization: {stage: 2}}"],
            finite_norms,
        ),
        "deepspeed_zero0_grad_norm": ("deepspeed", ranks, [ds, "strategy.config={}"], finite_norms),
        "fsdp_async_checkpoint": (
            "torchrun",
            ranks,
            ["strategy.type=fsdp", "checkpoint.async_save=true"],
            ran,
        ),
        "fp16_grad_scaler": ("python", 1, ["trainer.precision=fp16"], finite_norms),
        "ddp_compiled": ("torchrun", ranks, ["strategy.type=ddp", "trainer.compile=true"], ran),
        "ddp_sync_batchnorm": (
            "torchrun",
            ranks,
            ["strategy={type: ddp, sync_batchnorm: true}"],
            finite_norms,
        ),
        "fp32_reference": ("python", 1, parity, ran),
        "bf16_loss_parity": ("python", 1, parity + ["trainer.precision=bf16"], same_loss),
        "fp16_loss_parity": ("python", 1, parity + ["trainer.precision=fp16"], same_loss),
        "decoder_fsdp_mfu": ("torchrun", 1, decoder(cpu), throughput, LM),
    }
    if not cpu:  # a CPU has no peak FLOP/s for utilisation, and nothing to offload from
        found["mfu_bf16"] = (
            "python",
            1,
            ["trainer.precision=bf16"],
            lambda r, _: any(0 < x.get("train/mfu", 0) < 1 for x in r),
        )
        found["fsdp_cpu_offload_clipped"] = (
            "torchrun",
            ranks,
            ["strategy.type=fsdp", "strategy.cpu_offload=true", "trainer.grad_clip=1.0"],
            finite_norms,
        )
        found["pinned_memory"] = ("python", 1, ["data.pin_memory=true"], finite_norms)
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
    env = (
        {"DS_ACCELERATOR": "cpu", "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"} if cpu else {}
    )
    todo = checks(gpus, cpu)
    if args.only:
        wanted = set(args.only.split(","))
        if wanted & {"bf16_loss_parity", "fp16_loss_parity"}:
            wanted.add("fp32_reference")  # their verdict compares with it
        todo = {k: v for k, v in todo.items() if k in wanted}
    failed = 0
    print(f"| check | {'cpu' if cpu else torch.cuda.get_device_name(0)} x {max(1, gpus)} |")
    print("|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for name, (launcher, nproc, overrides, verdict, *config) in todo.items():
            rc, err = launch(launcher, nproc, overrides + [f"name={name}"], Path(tmp), env, *config)
            ok, figures = False, ""
            if rc == 0:
                got = verdict(rows(Path(tmp), name), lambda other: rows(Path(tmp), other))
                ok, figures = got if isinstance(got, tuple) else (got, "")
            if args.log:
                Path(args.log).mkdir(parents=True, exist_ok=True)
                (Path(args.log) / f"{name}.txt").write_text(err)
            last = _cause(err) or [f"exit {rc}"]
            said = "ok" if ok else "FAILED: " + (figures if rc == 0 else last[0][-200:])
            if ok and figures:
                said += f" ({figures})"
            print(f"| {name} | {said} |", flush=True)
            failed += not ok
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
