import json
import math

import pytest
from helpers import metrics, params, run, same

from src.core.callbacks.early_stopping import EarlyStopping
from src.core.callbacks.lr_finder import suggest_lr


class FakeTrainer:
    def __init__(self):
        self.should_stop, self.step = False, 0

        class S:
            is_main = True

        self.strategy = S()


@pytest.mark.parametrize(
    "values,mode,kw,stop_after",
    [
        ([1.0, 0.9, 0.95, 0.96], "min", {"patience": 2}, 4),
        ([1.0, 0.9, 0.8, 0.7], "min", {"patience": 1}, None),
        ([0.5, 0.6, 0.6, 0.6], "max", {"patience": 2}, 4),
        ([1.0, 0.9, 0.8, 0.7], "min", {"patience": 1, "min_delta": 0.2}, 2),
        ([1.0, float("nan")], "min", {"patience": 5}, 2),
        ([1.0, 50.0], "min", {"patience": 5, "divergence_threshold": 10.0}, 2),
    ],
)
def test_early_stopping(values, mode, kw, stop_after):
    cb, t = EarlyStopping(monitor="val/loss", mode=mode, **kw), FakeTrainer()
    stopped = None
    for i, v in enumerate(values, 1):
        cb.on_validation_end(t, {"val/loss": v})
        if t.should_stop and stopped is None:
            stopped = i
    assert stopped == stop_after


def test_early_stopping_ends_a_run(write_config, tmp_path):
    run(
        write_config(
            {
                "trainer.max_steps": 200,
                "trainer.eval_every_n_steps": 5,
                "optimizer.lr": 1e-12,  # (lr must be > 0): weights all but frozen
                "callbacks": [
                    {
                        "type": "early_stopping",
                        "monitor": "val/loss",
                        "patience": 2,
                        "min_delta": 1e-6,
                    }
                ],
            }
        )
    )
    assert metrics(tmp_path / "runs/tiny")[-1]["step"] == 15


def test_suggest_lr_finds_the_steepest_descent():
    lrs = [10 ** (-6 + i * 0.25) for i in range(25)]
    losses = [2.0 - 1.5 / (1 + math.exp(-(math.log10(lr) + 3) * 4)) for lr in lrs]
    assert 10**-3.5 <= suggest_lr(lrs, losses) <= 10**-2.5


def test_lr_finder_restores_the_run_and_writes_its_plot(write_config, tmp_path):
    plain = params(run(write_config({"name": "plain"})))
    found = run(
        write_config({"name": "found", "callbacks": [{"type": "lr_finder", "num_steps": 30}]})
    )
    assert same(plain, params(found))  # the range test left no trace in training
    out = json.loads((tmp_path / "runs/found/lr_finder.json").read_text())
    assert out["suggested_lr"] > 0 and len(out["lr"]) >= 5
    assert (tmp_path / "runs/found/lr_finder.png").stat().st_size > 1000


def test_ema_is_used_for_eval_and_resumes_exactly(write_config, tmp_path):
    ema = [{"type": "ema", "decay": 0.9}]
    base = {
        "callbacks": ema,
        "trainer.eval_every_n_steps": 10,
        "trainer.max_steps": 30,
        "checkpoint.every_n_steps": 10,
    }
    straight = run(write_config({**base, "name": "a"}))
    cfg = write_config({**base, "name": "b"})
    run(cfg, "trainer.max_steps=20")
    run(cfg)  # resumes at 20 with the EMA shadow restored
    assert same(params(straight), params(run(cfg)))
    assert metrics(tmp_path / "runs/a") == metrics(tmp_path / "runs/b")
    no_ema = run(write_config({**base, "name": "c", "callbacks": []}))

    def val(name):
        return [r["val/loss"] for r in metrics(tmp_path / "runs" / name) if "val/loss" in r]

    assert val("c")[0] != val("a")[0]  # evaluated with the average, not the training weights
    assert same(params(no_ema), params(straight))  # EMA never touches the training weights


def test_monitors_add_their_metrics(write_config, tmp_path):
    run(
        write_config(
            {
                "callbacks": [
                    {"type": "lr_monitor", "log_momentum": True},
                    {"type": "gradient_monitor", "per_layer": True},
                    {"type": "cuda_max_memory"},
                    {"type": "progress_bar"},
                ]
            }
        )
    )
    row = metrics(tmp_path / "runs/tiny")[0]
    assert row["train/lr_group0"] == row["train/lr"] and row["train/momentum_group0"] == 0.9
    assert row["train/grad_norm_max"] >= row["train/grad_norm"]
    assert "grad_norm/model.net.1.weight" in row


def test_model_checkpoint_keeps_the_best(write_config, tmp_path):
    run(
        write_config(
            {
                "trainer.eval_every_n_steps": 5,
                "checkpoint.every_n_steps": None,
                "checkpoint.keep_last": 1,
                "callbacks": [
                    {
                        "type": "model_checkpoint",
                        "monitor": "val/accuracy",
                        "mode": "max",
                        "top_k": 2,
                    }
                ],
            }
        )
    )
    kept = sorted(p.name for p in (tmp_path / "runs/tiny/checkpoints").glob("step_*"))
    rows = {
        r["step"]: r["val/accuracy"] for r in metrics(tmp_path / "runs/tiny") if "val/accuracy" in r
    }
    best2 = sorted(rows, key=rows.get, reverse=True)[:2]
    assert set(kept) == {f"step_{s:08d}" for s in best2} | {"step_00000020"}


def test_profiler_trace_parses_and_holds_the_active_steps(write_config, tmp_path, capsys):
    import json

    from helpers import run

    run(
        write_config(
            {
                "callbacks": [{"type": "profiler", "wait": 2, "warmup": 1, "active": 4}],
                "trainer.max_steps": 12,
            }
        )
    )
    out = tmp_path / "runs/tiny/profiler"
    traces = list(out.glob("trace_*.json"))
    assert len(traces) == 1
    events = json.loads(traces[0].read_text())["traceEvents"]
    steps = sorted(e["name"] for e in events if e.get("name", "").startswith("ProfilerStep#"))
    assert steps == [f"ProfilerStep#{i}" for i in range(3, 7)]  # after wait 2 + warm-up 1
    assert list((out / "tensorboard").glob("*.pt.trace.json"))
    table = (out / "top_ops.txt").read_text()
    assert "aten::addmm" in table and "Self CPU time total" in table
    assert "profiler: top ops by self_cpu_time_total" in capsys.readouterr().out
