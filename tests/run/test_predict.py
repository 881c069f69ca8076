"""predict: one row per sample, in dataset order, whatever the number of processes; the rows are
the model's own predictions (their accuracy is the run's validation accuracy)."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import numpy as np
import pytest
from conftest import make_config
from helpers import GPT, run, torchrun

from src.main import main

DIGITS_VAL = 359  # scikit-learn's digits: 1797 samples, val_fraction 0.2


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("predict")
    cfg = make_config(
        tmp,
        {
            "name": "cnn",
            "model": {"type": "cnn", "channels": [8, 16]},
            "trainer.max_steps": 40,
            "trainer.eval_every_n_steps": 40,
            "checkpoint.every_n_steps": 40,
        },
    )
    run(cfg)
    return tmp / "runs" / "cnn"


def read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def last_val_accuracy(run_dir: Path) -> float:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["val/accuracy"] for r in rows if "val/accuracy" in r][-1]


def test_predictions_on_other_data_do_not_replace_the_runs_own(digits_run):
    assert main(["predict", "--run", str(digits_run)]) == 0
    own = digits_run / "predictions" / "val-step_00000040.jsonl"
    before = own.read_bytes()
    assert main(["predict", "--run", str(digits_run), "--data", "val_fraction=0.5"]) == 0
    assert own.read_bytes() == before
    (other,) = (digits_run / "predictions").glob("val-digits-*-step_00000040.jsonl")
    assert len(read(other)) > len(read(own))  # half the digits, not the run's fifth


def test_predict_writes_every_validation_sample_in_order_with_the_runs_accuracy(digits_run, capsys):
    assert main(["predict", "--run", str(digits_run)]) == 0
    out = digits_run / "predictions" / "val-step_00000040.jsonl"
    rows = read(out)
    assert [r["id"] for r in rows] == list(range(DIGITS_VAL))
    accuracy = np.mean([r["label"] == r["target"] for r in rows])
    assert accuracy == pytest.approx(last_val_accuracy(digits_run), abs=1e-6)
    assert f"accuracy {accuracy:.4f}" in capsys.readouterr().out
    row = rows[0]
    assert row["name"] == str(row["label"]) and len(row["top_k"]) == 5
    assert row["top_k"][0]["label"] == row["label"]
    probs = [t["prob"] for t in row["top_k"]]
    assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1 + 1e-5
    assert stat.S_IMODE(out.stat().st_mode) == 0o666 & ~_umask()  # not 0600
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no temporary left


def _umask() -> int:
    m = os.umask(0)
    os.umask(m)
    return m


def test_predict_under_two_processes_equals_one_process(digits_run, tmp_path):
    one, two = tmp_path / "one.jsonl", tmp_path / "two.jsonl"
    assert main(["predict", "--run", str(digits_run), "--out", str(one)]) == 0
    torchrun(2, "predict", str(digits_run), "--out", str(two), "--batch-size", "16")
    a, b = read(one), read(two)
    assert len(b) == DIGITS_VAL and [r["id"] for r in b] == list(range(DIGITS_VAL))
    assert [r["label"] for r in a] == [r["label"] for r in b]
    assert [r["target"] for r in a] == [r["target"] for r in b]
    assert max(abs(x["prob"] - y["prob"]) for x, y in zip(a, b)) < 1e-6


def test_predict_csv_npy_train_split_and_latest_pointer(digits_run, tmp_path):
    csv_out, npy_out = tmp_path / "p.csv", tmp_path / "p.npy"
    latest = digits_run / "checkpoints" / "latest"
    assert main(["predict", "--checkpoint", str(latest), "--out", str(csv_out)]) == 0
    lines = csv_out.read_text().splitlines()
    assert lines[0] == "id,label,name,prob,target,target_name" and len(lines) == DIGITS_VAL + 1
    assert (
        main(["predict", "--run", str(digits_run), "--split", "train", "--out", str(npy_out)]) == 0
    )
    probs = np.load(npy_out)
    assert probs.shape == (1797 - DIGITS_VAL, 10)
    np.testing.assert_allclose(probs.sum(1), 1, atol=1e-5)


def test_predict_embeddings_and_features(tmp_path):
    """Metric learning: L2-normalised embeddings; SSL: backbone features, one row per sample."""
    for name, changes, key in (
        (
            "arc",
            {
                "task": {"type": "metric_learning", "embedding_dim": 16},
                "model": {"type": "cnn", "channels": [8, 16], "num_classes": 0},
            },
            "embedding",
        ),
        (
            "ssl",
            {
                "task": {"type": "simclr", "proj_dim": 8},
                "model": {"type": "cnn", "channels": [8, 16], "num_classes": 0},
            },
            "features",
        ),
    ):
        cfg = make_config(
            tmp_path,
            {"name": name, **changes, "trainer.max_steps": 2, "checkpoint.every_n_steps": 2},
            f"{name}.yaml",
        )
        run(cfg)
        out = tmp_path / f"{name}.npy"
        assert main(["predict", "--run", str(tmp_path / "runs" / name), "--out", str(out)]) == 0
        values = np.load(out)
        assert values.shape[0] == DIGITS_VAL and np.isfinite(values).all()
        if key == "embedding":
            np.testing.assert_allclose(np.linalg.norm(values, axis=1), 1, rtol=1e-5)
        rows = read(_jsonl(tmp_path, name))
        assert len(rows[0][key]) == values.shape[1]


def _jsonl(tmp_path: Path, name: str) -> Path:
    out = tmp_path / f"{name}.jsonl"
    assert main(["predict", "--run", str(tmp_path / "runs" / name), "--out", str(out)]) == 0
    return out


def test_predict_generates_for_prompts_the_same_in_any_process_count(tmp_path):
    cfg = make_config(
        tmp_path,
        {
            "name": "lm",
            "model": GPT,
            "task": {"type": "causal_lm", "samples": 0},
            "data": {
                "type": "text",
                "paths": ["stdlib:json"],
                "vocab_size": 400,
                "block_size": 32,
                "val_fraction": 0.3,
                "batch_size": 8,
            },
            "trainer.max_steps": 2,
            "checkpoint.every_n_steps": 2,
        },
    )
    run(cfg)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(
        "\n".join(json.dumps({"prompt": p}) for p in ("def main(", "import os", "class A:")) + "\n"
    )
    run_dir = str(tmp_path / "runs" / "lm")
    one, two = tmp_path / "one.jsonl", tmp_path / "two.jsonl"
    args = ["--prompts", str(prompts), "--max-new-tokens", "6", "--temperature", "0.9"]
    assert main(["predict", "--run", run_dir, "--out", str(one), *args]) == 0
    torchrun(2, "predict", run_dir, "--out", str(two), *args)
    a, b = read(one), read(two)
    assert [r["prompt"] for r in a] == ["def main(", "import os", "class A:"]
    assert a == b and all(isinstance(r["text"], str) for r in a)
    assert main(["predict", "--run", run_dir, "--out", str(one), *args]) == 0
    assert read(one) == a  # seeded: the same text again


@pytest.mark.parametrize(
    "args, message",
    [
        (["--run", "/nonexistent/run"], "no such run folder"),
        (["--run", "{run}x"], "no such run folder; did you mean {run}?"),
        (["--run", "{empty}"], "not a run folder"),
        (["--run", "{uncommitted}"], "holds no committed checkpoint"),
        (["--run", "{run}", "--out", "p.txt"], "write .jsonl, .csv or .npy"),
        (["--run", "{run}", "--data", "type=nope"], "data.type"),
        (["--run", "{run}", "--data", "nokey"], "is not KEY=VALUE"),
        (["--run", "{run}", "--batch-size", "0"], "below 1"),
        (["--run", "{run}", "--device", "cuda:9"], "--device: cuda:9 does not exist here"),
        (["--run", "{run}", "--prompts", "/nonexistent.txt"], "no such file"),
        (["--checkpoint", "{run}/checkpoints/step_00000007"], "no such checkpoint"),
    ],
)
def test_bad_predict_input_is_one_line_exit_2(digits_run, tmp_path, capsys, args, message):
    (tmp_path / "empty").mkdir()
    unc = tmp_path / "uncommitted"
    (unc / "checkpoints" / "step_00000005").mkdir(parents=True)
    (unc / "config.yaml").write_text((digits_run / "config.yaml").read_text())
    args = [a.format(run=digits_run, empty=tmp_path / "empty", uncommitted=unc) for a in args]
    message = message.format(run=digits_run)
    before = sorted(p.name for p in digits_run.rglob("*"))
    assert main(["predict", *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert sorted(p.name for p in digits_run.rglob("*")) == before
