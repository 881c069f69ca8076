"""The composition root: what build() does to a model before the strategy gets it."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import run
from torch import nn

from src.core.errors import ConfigError
from src.core.registry import MODELS
from src.main import main


@MODELS.register("test_lazy_mlp")
def lazy_mlp(info, hidden: int = 32):
    """A user's model that does not type its input width: nn.LazyLinear takes it from data."""
    return nn.Sequential(
        nn.Flatten(), nn.LazyLinear(hidden), nn.ReLU(), nn.LazyLinear(info.num_classes)
    )


def test_a_model_with_lazy_layers_trains_resumes_and_exports(write_config, tmp_path):
    cfg = write_config(
        {
            "model": {"type": "test_lazy_mlp"},
            "trainer.max_steps": 40,
            "optimizer.lr": 1e-2,
            "trainer.eval_every_n_steps": 40,
        }
    )
    exp = run(cfg, "trainer.max_steps=20")
    first = exp.task.model[1].weight
    assert first.shape == (32, 64) and not isinstance(first, nn.parameter.UninitializedParameter)
    exp = run(cfg)  # resumed from step 20: the checkpoint loads into the materialised layers
    rows = [json.loads(x) for x in (tmp_path / "runs/tiny/metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "val/accuracy" in r]
    assert [r["step"] for r in evals] == [20, 40] and evals[-1]["val/accuracy"] > 0.8
    assert main(["export", str(tmp_path / "runs/tiny"), "--out", str(tmp_path / "m.onnx")]) == 0


def test_lazy_layers_with_no_forward_to_run_are_one_line(write_config, monkeypatch):
    from src.algorithms.base import Task
    from src.algorithms.classification import Classification
    from src.run.experiment import build, prepare

    monkeypatch.setattr(Classification, "inference", Task.inference)
    cfg, origins = prepare(str(write_config({"model": {"type": "test_lazy_mlp"}})))
    with pytest.raises(
        ConfigError,
        match=r"^model: model 'test_lazy_mlp' has lazy layers .*"
        r"task 'classification' has no inference model",
    ):
        build(cfg, origins)


def test_lazy_layers_are_materialised_alike_for_every_seed_and_rank(write_config):
    """Built from the seed: every rank of a run (all build with cfg.seed) gets the same
    initial weights, as for any other model."""
    from src.core.seeding import seed_everything
    from src.run.experiment import build_task, prepare

    cfg, _ = prepare(str(write_config({"model": {"type": "test_lazy_mlp"}})))
    weights = []
    for _ in range(2):
        seed_everything(cfg.seed)
        weights.append(build_task(cfg)[2].model[1].weight.detach().clone())
    torch.testing.assert_close(weights[0], weights[1])
