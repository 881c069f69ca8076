"""Every YAML in configs/ runs for a few steps (STYLE: the override table as integration tests)."""
from pathlib import Path

import pytest

from conftest import ROOT
from helpers import metrics, run

CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))
SMOKE = ["trainer.max_steps=3", "trainer.max_epochs=null", "trainer.log_every=1",
         "checkpoint.every_n_steps=2"]


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_config_runs_a_few_steps(path: Path, tmp_path):
    run(path, *SMOKE, f"logging.root={tmp_path}", "logging.loggers=[jsonl]")
    run_dir = next(p for p in tmp_path.iterdir() if p.is_dir())
    rows = metrics(run_dir)
    assert [r["step"] for r in rows if "train/loss" in r] == [1, 2, 3]
    assert (run_dir / "checkpoints/step_00000003/COMMIT").exists()


OVERRIDES = [
    ["trainer.precision=bf16"],
    ["trainer.grad_accum_steps=2", "data.batch_size=32"],
    ["model={type: mlp, hidden: [64]}"],
    ["optimizer={type: sgd, lr: 0.05, momentum: 0.9}"],
    ["scheduler={type: onecycle}"],
    ["trainer.eval_every_n_steps=2"],
]


@pytest.mark.parametrize("overrides", OVERRIDES, ids=[" ".join(o) for o in OVERRIDES])
def test_exp001_with_overrides(overrides, tmp_path):
    run(ROOT / "configs/exp001.yaml", *SMOKE, *overrides, f"logging.root={tmp_path}",
        "logging.loggers=[jsonl]")
    assert metrics(tmp_path / "exp001")[-1]["step"] == 3
