"""Helpers shared by tests: run an experiment in-process and read what it wrote."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import torch
import warm
from conftest import ROOT, port

from src.core.callbacks.base import Callback
from src.core.registry import CALLBACKS
from src.run.experiment import build, prepare


def run(config: Path, *overrides: str):
    """Build and train in this process; returns the Experiment (its task holds the weights)."""
    cfg, origins = prepare(str(config), list(overrides))
    exp = build(cfg, origins)
    exp.run()
    return exp


def stop_and_resume(
    write_config, runs: Path, section: dict, step: int, callbacks: list = ()
) -> tuple:
    """``section`` run straight (run ``a``) and stopped by a signal during ``step`` then resumed
    (run ``b``), both with ``callbacks``. Returns (straight, resumed, a's metric rows after
    ``step``, b's)."""
    import pytest

    callbacks = list(callbacks)
    straight = run(write_config({**section, "name": "a", "callbacks": callbacks}))
    cfg = write_config(
        {
            **section,
            "name": "b",
            "callbacks": [*callbacks, {"type": "signal_at_step", "step": step}],
        }
    )
    with pytest.raises(SystemExit):
        run(cfg)
    resumed = run(cfg, f"callbacks={json.dumps(callbacks)}")
    after = [[r for r in metrics(runs / name) if r["step"] > step] for name in ("a", "b")]
    return straight, resumed, *after


def launch(
    nproc: int,
    config: Path,
    *overrides: str,
    launcher: str = "warm",
    expect: int = 0,
    cwd: Path = ROOT,
    master_port: int = 0,
) -> subprocess.CompletedProcess:
    """``nproc`` ranks of ``python -m src.main --config config OVERRIDES``: forked warm with
    torchrun's variables (``launcher="warm"``, tests/warm.py), or under the real ``torchrun`` or
    ``deepspeed`` launcher where the launcher is part of what a test checks. The exit code is
    the launcher's (warm: 0, or 1 when a rank failed; each rank's in ``returncodes``)."""
    env = {
        **os.environ,
        "PYTHONPATH": f"{ROOT}:{config.parent}",
        "OMP_NUM_THREADS": "1",
        "DS_ACCELERATOR": "cpu",  # the deepspeed strategy under any launcher
    }
    master_port = master_port or port()
    args = ["--config", str(config), *overrides]
    if launcher == "warm":
        out = warm.launch(nproc, *args, cwd=cwd, env=env, master_port=master_port)
        assert out.returncode == expect, out.stdout[-3000:] + out.stderr[-3000:]
        return out
    if launcher == "torchrun":
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            f"--nproc_per_node={nproc}",
            f"--master_port={master_port}",
            "-m",
            "src.main",
        ]
    else:
        cmd = [
            sys.executable,
            "-m",
            "deepspeed.launcher.runner",
            f"--num_gpus={nproc}",
            f"--master_port={master_port}",
            "--module",
            "src.main",
        ]
    out = subprocess.run(cmd + args, env=env, cwd=cwd, capture_output=True, text=True, timeout=400)
    assert out.returncode == expect, out.stdout[-3000:] + out.stderr[-3000:]
    return out


def torchrun(nproc: int, *args: str, expect: int = 0) -> subprocess.CompletedProcess:
    """``nproc`` ranks of ``python -m src.main ARGS`` (any subcommand) with torchrun's
    variables, forked warm (tests/warm.py)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    out = warm.launch(nproc, *args, env=env, master_port=port())
    assert out.returncode == expect, out.stdout[-3000:] + out.stderr[-3000:]
    return out


# A one-layer GPT-2 built from config (nothing downloaded), for language-model tests.
GPT = {
    "type": "hf",
    "kind": "causal_lm",
    "config": {"model_type": "gpt2", "n_layer": 1, "n_head": 2, "n_embd": 32, "n_positions": 64},
}

# That GPT with a LoRA adapter on the json package's source (a few seconds a run).
LM_DATA = {
    "data": {
        "type": "text",
        "paths": ["stdlib:json"],
        "vocab_size": 400,
        "block_size": 32,
        "val_fraction": 0.3,
        "batch_size": 8,
    },
    "model": {**GPT, "adapter": {"type": "lora", "r": 4, "alpha": 8, "target_modules": ["c_attn"]}},
    "task": {"type": "causal_lm", "samples": 0},
}

TIMINGS = ("time", "train/samples_per_sec", "train/tokens_per_sec", "train/tflops", "train/mfu")


def metrics(run_dir: Path, drop=TIMINGS):
    """A run's metric rows without the wall-clock figures (which differ between any two runs)."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in drop} for r in rows]


def params(exp) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in exp.task.state_dict().items()}


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@CALLBACKS.register("signal_at_step")
class SignalAtStep(Callback):
    """Sends this process a signal during the given step (tests of stop-and-resume)."""

    def __init__(self, step: int, signum: int = int(signal.SIGTERM)):
        self.at, self.signum = step, signum

    def on_before_optimizer_step(self, trainer, grad_norm) -> None:
        if trainer.step + 1 == self.at:
            os.kill(os.getpid(), self.signum)


# A plugin module for launched runs (written as stop_plugin.py): `imports: [stop_plugin]` and
# `callbacks: [{type: stop_at, step: N}]`
STOP_PLUGIN = '''
import os, signal
from src.core.callbacks.base import Callback
from src.core.registry import CALLBACKS

@CALLBACKS.register("stop_at")
class StopAt(Callback):
    """Every rank gets SIGTERM during the given step, as a cluster's pre-emption would send."""
    def __init__(self, step: int):
        self.at = step
    def on_before_optimizer_step(self, trainer, grad_norm):
        if trainer.step + 1 == self.at:
            os.kill(os.getpid(), signal.SIGTERM)
'''

KILL_PLUGIN = '''
import os, signal
from src.core.callbacks.base import Callback
from src.core.registry import CALLBACKS

@CALLBACKS.register("kill_at")
class KillAt(Callback):
    """kill -9 of every rank once the given step is taken (no chance to save)."""
    def __init__(self, step: int):
        self.at = step
    def on_step_end(self, trainer, outputs):
        if trainer.step == self.at:
            os.kill(os.getpid(), signal.SIGKILL)
'''


def digits_folder(root: Path, size: int = 8, limit: int | None = None) -> Path:
    """scikit-learn's digits as grey PNG files in the ImageFolder layout (root/<digit>/<n>.png),
    pixel values 0-16 scaled to 0-240."""
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    d = load_digits()
    for n, (x, y) in enumerate(zip(d.images[:limit], d.target[:limit])):
        (root / str(y)).mkdir(parents=True, exist_ok=True)
        im = Image.fromarray((x * 15).astype(np.uint8))
        if size != 8:
            im = im.resize((size, size), Image.Resampling.BILINEAR)
        im.save(root / str(y) / f"{n:05d}.png")
    return root
