"""A rerun never lies and never rewrites history: resume, extend, refuse, and a new folder."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import yaml
from helpers import metrics

from src.core.errors import ConfigError
from src.main import main
from src.run.record import decide, differences

BASE = [
    "trainer.max_steps=20",
    "trainer.log_every=5",
    "checkpoint.every_n_steps=10",
    "scheduler={type: warmup_cosine, warmup_steps: 2}",
]


def snapshot(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.fixture
def trained(write_config, tmp_path, capsys):
    """A finished 20-step run in tmp_path/runs/tiny; returns (config path, run folder)."""
    cfg = write_config()
    assert main(["--config", str(cfg), *BASE]) == 0
    capsys.readouterr()
    return cfg, tmp_path / "runs/tiny"


def test_a_changed_optimizer_value_is_refused_and_the_folder_is_untouched(trained, capsys):
    cfg, run_dir = trained
    before = snapshot(run_dir)
    assert main(["--config", str(cfg), *BASE, "optimizer.lr=0.5"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "optimizer.lr 0.001 -> 0.5" in err[0]
    assert "name=<new name> or --new-run" in err[0]
    assert snapshot(run_dir) == before


def test_a_larger_max_steps_extends_without_restretching_the_schedule(trained, capsys):
    cfg, run_dir = trained
    lr_at_end = [r["train/lr"] for r in metrics(run_dir) if "train/lr" in r][-1]
    more = [a.replace("max_steps=20", "max_steps=30") for a in BASE]
    assert main(["--config", str(cfg), *more]) == 0
    rows = [r for r in metrics(run_dir) if "train/lr" in r]
    assert [r["step"] for r in rows] == [5, 10, 15, 20, 25, 30]
    # the cosine ended at step 20; the extension goes on at its final rate, not a new cosine
    assert rows[-1]["train/lr"] == pytest.approx(lr_at_end, abs=1e-12)
    assert sorted(p.name for p in (run_dir / "configs").iterdir()) == ["000.yaml", "001.yaml"]
    assert yaml.safe_load((run_dir / "configs/000.yaml").read_text())["trainer"]["max_steps"] == 20
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["trainer"]["max_steps"] == 30
    info = json.loads((run_dir / "run_info.json").read_text())
    assert info["changes"] == [{"key": "trainer.max_steps", "old": 20, "new": 30}]
    assert info["derived"]["schedule_horizon"] == 20


def test_the_same_command_again_resumes_and_rewrites_nothing(trained, capsys):
    cfg, run_dir = trained
    before = snapshot(run_dir)
    assert main(["--config", str(cfg), *BASE]) == 0
    assert "already finished" in capsys.readouterr().out
    assert snapshot(run_dir) == before


def test_a_failed_resume_leaves_the_folder_byte_identical(trained, capsys):
    cfg, run_dir = trained
    for f in (run_dir / "checkpoints").rglob("model.safetensors"):
        f.write_bytes(b"not a safetensors file")  # every checkpoint unreadable
    before = snapshot(run_dir)
    assert main(["--config", str(cfg), *BASE, "trainer.max_steps=40"]) == 2
    assert "could be read" in capsys.readouterr().err
    assert snapshot(run_dir) == before


def test_a_checkpoint_of_another_model_creates_no_folder(trained, tmp_path, capsys):
    cfg, run_dir = trained
    ckpt = run_dir / "checkpoints/step_00000020"
    assert (
        main(
            [
                "--config",
                str(cfg),
                *BASE,
                "name=other",
                "model.hidden=[7]",
                f"checkpoint.resume={ckpt}",
            ]
        )
        == 2
    )
    assert "error:" in capsys.readouterr().err
    assert not (tmp_path / "runs/other").exists()


def test_new_run_trains_in_the_next_free_folder(trained, tmp_path, capsys):
    cfg, run_dir = trained
    before = snapshot(run_dir)
    assert main(["--config", str(cfg), *BASE, "optimizer.lr=0.5", "--new-run"]) == 0
    assert snapshot(run_dir) == before
    other = tmp_path / "runs/tiny-2"
    assert yaml.safe_load((other / "config.yaml").read_text())["name"] == "tiny-2"
    assert metrics(other)[-1]["step"] == 20


def test_decisions_for_strategies_and_extend_keys(tmp_path):
    run_dir = tmp_path / "r"
    run_dir.mkdir()
    old = {
        "strategy": {"type": "single"},
        "optimizer": {"type": "adamw", "lr": 0.1},
        "trainer": {"max_steps": 10, "log_every": 5},
    }
    (run_dir / "config.yaml").write_text(yaml.safe_dump(old))
    (run_dir / "run_info.json").write_text(json.dumps({"derived": {"total_steps": 10}}))

    def new(**changes):
        cfg = json.loads(json.dumps(old))
        for k, v in changes.items():
            sec, key = k.split("__")
            cfg[sec][key] = v
        return cfg

    assert decide(run_dir, new(), True).kind == "resume"
    d = decide(run_dir, new(trainer__max_steps=20, trainer__log_every=1), True)
    assert d.kind == "extend" and d.horizon == 10 and len(d.changes) == 2
    assert decide(run_dir, new(strategy__type="fsdp"), True).kind == "extend"
    with pytest.raises(ConfigError, match="strategy.type 'single' -> 'deepspeed'"):
        decide(run_dir, new(strategy__type="deepspeed"), True)
    with pytest.raises(ConfigError, match="optimizer.lr 0.1 -> 0.2"):
        decide(run_dir, new(optimizer__lr=0.2), True)
    assert decide(run_dir, new(optimizer__lr=0.2), False).kind == "new"
    assert differences({"a": {"b": 1}}, {"a": {"b": 1, "c": 2}}) == [("a.c", None, 2)]
    # a key the platform gained after the run started, at its default, is no difference
    grown = {**new(), "needs": {}}
    assert decide(run_dir, grown, True, frozenset({"needs"})).kind == "resume"
    with pytest.raises(ConfigError, match="needs None -> {}"):
        decide(run_dir, grown, True)
