"""Checkpoint speed: save+commit and load of a large model with AdamW state, against plain
``torch.save``/``torch.load`` of the same state on the same disk; and the async save option,
where the training step is blocked only while the state is copied to host memory."""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path

import torch


def make_state(params_millions: int):
    """Linear layers of 4096x4096 (16.8M parameters each) and AdamW state after one step."""
    width = 4096 if params_millions >= 16 else 512
    layers = max(1, round(params_millions * 1e6 / (width * width)))
    model = torch.nn.Sequential(*[torch.nn.Linear(width, width, bias=False) for _ in range(layers)])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    return model, opt


def step_compute(model, x) -> None:
    """A forward and backward pass: what a training step does before the optimizer runs."""
    model(x).square().mean().backward()


def _fsync_tree(path: Path) -> None:
    for f in [path] if path.is_file() else path.rglob("*"):
        if f.is_file():
            fd = os.open(f, os.O_RDONLY)
            os.fsync(fd)
            os.close(fd)


def measure(params_millions: int = 100, repeats: int = 3) -> dict[str, list[float]]:
    from src.core.checkpoint import CheckpointManager
    from src.core.config import CheckpointConfig
    from src.distributed.single import SingleDeviceStrategy

    model, opt = make_state(params_millions)
    strategy = SingleDeviceStrategy("cpu")
    strategy.setup()
    root = Path(tempfile.mkdtemp(dir=os.environ.get("BENCH_TMP")))
    out: dict[str, list[float]] = {
        k: []
        for k in (
            "torch.save",
            "torch.load",
            "ours save+commit",
            "ours load",
            "async blocked",
            "async total",
            "one training step (fwd+bwd)",
        )
    }
    x = torch.randn(32, model[0].in_features)
    out["parameters_millions"] = [sum(p.numel() for p in model.parameters()) / 1e6]
    try:
        for i in range(repeats):
            f = root / f"plain_{i}.pt"
            t0 = time.perf_counter()
            torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, f)
            _fsync_tree(f)
            out["torch.save"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            state = torch.load(f, map_location="cpu", weights_only=True)
            model.load_state_dict(state["model"])
            opt.load_state_dict(state["optimizer"])
            out["torch.load"].append(time.perf_counter() - t0)
            f.unlink()

            manager = CheckpointManager(CheckpointConfig(keep_last=1), root / "ours", strategy)
            t0 = time.perf_counter()
            path = manager.save(i + 1, 0, model, opt, {"step": i + 1}, {})
            out["ours save+commit"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            strategy.load(path, model, opt)
            out["ours load"].append(time.perf_counter() - t0)

            manager = CheckpointManager(
                CheckpointConfig(keep_last=1, async_save=True), root / "async", strategy
            )
            t0 = time.perf_counter()
            manager.save(i + 1, 0, model, opt, {"step": i + 1}, {})
            blocked = time.perf_counter() - t0
            step_compute(model, x)  # the next step's forward and backward run meanwhile
            t1 = time.perf_counter()
            manager.before_update()  # where the trainer waits before changing the weights
            blocked += time.perf_counter() - t1
            out["async blocked"].append(blocked)
            manager.wait()
            out["async total"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            step_compute(model, x)
            out["one training step (fwd+bwd)"].append(time.perf_counter() - t0)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return out
