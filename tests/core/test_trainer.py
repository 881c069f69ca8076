import math
import warnings

import pytest
import torch
from helpers import metrics, params, run, same

from src.algorithms.classification import Classification
from src.core.registry import TASKS
from src.core.trainer import TrainingDiverged
from src.run.experiment import build, prepare


@TASKS.register("nan_at_steps")
class NaNAtSteps(Classification):
    """Classification whose loss is NaN on the listed micro-batch calls (1-based)."""

    def __init__(self, model, steps: list[int] = []):
        super().__init__(model)
        self.bad, self.calls = set(steps), 0

    def training_step(self, batch):
        out = super().training_step(batch)
        self.calls += 1
        if self.calls in self.bad:
            out["loss"] = out["loss"] * float("nan")
        return out


@TASKS.register("huge_loss_at_steps")
class HugeLossAtSteps(NaNAtSteps):
    """Its loss is scaled by 1e4 on the listed calls: finite, but fp16 gradients overflow. The
    call count is checkpointed, so a resumed run spikes at the same call."""

    def training_step(self, batch):
        out = Classification.training_step(self, batch)
        self.calls += 1
        if self.calls in self.bad:
            out["loss"] = out["loss"] * 1e4
        return out

    def extra_state(self):
        return {"calls": self.calls}

    def load_extra_state(self, state):
        self.calls = state.get("calls", 0)


def test_jsonl_rows_have_step_epoch_time_and_split_names(write_config, tmp_path):
    run(write_config({"trainer.eval_every_n_steps": 10}))
    rows = metrics(tmp_path / "runs/tiny", drop=())
    assert [r["step"] for r in rows if "train/loss" in r] == [5, 10, 15, 20]
    assert [r["step"] for r in rows if "val/accuracy" in r] == [10, 20]
    first = rows[0]
    for key in (
        "step",
        "epoch",
        "time",
        "train/loss",
        "train/accuracy",
        "train/lr",
        "train/grad_norm",
        "train/samples_per_sec",
    ):
        assert key in first


def test_stops_at_whichever_limit_comes_first(write_config, tmp_path):
    exp = run(write_config({"trainer.max_steps": 1000, "trainer.max_epochs": 1}))
    assert exp.derived["total_steps"] == 44  # 1,438 samples // 32
    rows = metrics(tmp_path / "runs/tiny")
    assert rows[-1]["step"] == 44


def test_accumulation_matches_a_big_batch(write_config, tmp_path):
    """2 micro-batches of 16 == 1 batch of 32: same samples, loss averaged, one optimizer step."""
    big = params(run(write_config({"name": "big"}), "data.batch_size=32"))
    small = params(
        run(write_config({"name": "small"}), "data.batch_size=16", "trainer.grad_accum_steps=2")
    )
    for k in big:
        torch.testing.assert_close(big[k], small[k], rtol=1e-5, atol=1e-6)
    assert metrics(tmp_path / "runs/small")[-1]["step"] == 20


def test_non_finite_steps_are_skipped_counted_and_stop_the_run(write_config, tmp_path):
    cfg = write_config(
        {
            "task": {"type": "nan_at_steps", "steps": [3]},
            "trainer.max_steps": 5,
            "scheduler": {"type": "warmup_linear"},
        }
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        exp = run(cfg)
    assert any("non-finite" in str(w.message) for w in caught)
    rows = [r for r in metrics(tmp_path / "runs/tiny") if "train/loss" in r]
    assert rows[-1]["train/bad_steps"] == 1 and math.isfinite(rows[-1]["train/loss"])
    assert exp.scheduler.last_epoch == 4  # 5 steps, one skipped: no scheduler step for it

    # the bad update is not applied: a run whose step 3 is bad ends where a run that never saw
    # that batch's gradient would; simplest check: parameters stay finite
    assert all(torch.isfinite(p).all() for p in exp.task.parameters())

    cfg = write_config(
        {
            "name": "diverge",
            "task": {"type": "nan_at_steps", "steps": list(range(4, 40))},
            "trainer.max_bad_steps": 3,
            "trainer.max_steps": 30,
        }
    )
    with pytest.raises(TrainingDiverged, match="3 consecutive non-finite steps"):
        run(cfg)
    saved = sorted((tmp_path / "runs/diverge/checkpoints").glob("step_*"))
    assert saved[-1].name == "step_00000006" and (saved[-1] / "COMMIT").exists()


def test_skipped_step_leaves_weights_untouched(write_config):
    from src.run.experiment import build, prepare

    cfg, o = prepare(
        str(write_config({"task": {"type": "nan_at_steps", "steps": [1]}, "trainer.max_steps": 1}))
    )
    exp = build(cfg, o)
    before = params(exp)
    exp.run()
    after = params(exp)
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_reduced_precision_trains_on_cpu(write_config, tmp_path, precision):
    run(
        write_config(
            {"trainer.precision": precision, "trainer.max_steps": 30, "optimizer.lr": 3e-3}
        )
    )
    rows = [r for r in metrics(tmp_path / "runs/tiny") if "train/loss" in r]
    assert rows[-1]["train/loss"] < rows[0]["train/loss"]


def test_grad_clip_bounds_the_update(write_config, tmp_path):
    """With SGD (no momentum, no decay) each update is lr x the clipped gradient: its norm is at
    most lr x max_norm, however large the gradient was."""
    cfg, origins = prepare(
        str(
            write_config(
                {
                    "trainer.grad_clip": 1e-3,
                    "optimizer": {"type": "sgd", "lr": 1.0, "weight_decay": 0.0},
                    "trainer.max_steps": 1,
                    "trainer.log_every": 1,
                }
            )
        )
    )
    exp = build(cfg, origins)
    before = params(exp)
    exp.run()
    after = params(exp)
    step = torch.cat([(after[k] - before[k]).flatten() for k in before]).norm()
    grad_norm = metrics(tmp_path / "runs/tiny")[0]["train/grad_norm"]  # the norm before clipping
    assert grad_norm > 0.1 and float(step) == pytest.approx(1e-3, rel=1e-3)


def test_deterministic_runs_are_bitwise_equal(write_config, tmp_path):
    """Two runs of one config with ``trainer.deterministic`` end with the same bits: weights
    and every logged loss (dropout and shuffling included)."""
    changes = {
        "trainer.deterministic": True,
        "trainer.max_steps": 12,
        "trainer.log_every": 1,
        "model": {"type": "mlp", "hidden": [32], "dropout": 0.3},
    }
    a = run(write_config({**changes, "name": "a"}))
    b = run(write_config({**changes, "name": "b"}))
    assert same(params(a), params(b))
    assert metrics(tmp_path / "runs/a") == metrics(tmp_path / "runs/b")
    assert len([r for r in metrics(tmp_path / "runs/a") if "train/loss" in r]) == 12


@pytest.mark.slow
def test_compiled_model_trains_and_keeps_parameter_names(write_config, tmp_path):
    plain = run(write_config({"name": "plain", "trainer.max_steps": 2}))
    compiled = run(
        write_config({"name": "compiled", "trainer.compile": True, "trainer.max_steps": 2})
    )
    assert params(plain).keys() == params(compiled).keys()


def test_mfu_from_measured_flops(write_config, tmp_path):
    """FLOPs of one step are counted once; MFU = achieved FLOP/s over the device peak."""
    exp = run(write_config({"trainer.peak_tflops": 1.0, "model.hidden": [32]}))
    # forward 2*B*(64*32 + 32*10); backward: weight grads the same, input grad of layer 2 only
    expected = 2 * 32 * (64 * 32 + 32 * 10) * 2 + 2 * 32 * 32 * 10
    assert exp.trainer.flops_per_micro == expected
    rows = [r for r in metrics(tmp_path / "runs/tiny", drop=()) if "train/loss" in r]
    assert 0 < rows[-1]["train/mfu"] < 1
    assert rows[-1]["train/tflops"] == pytest.approx(rows[-1]["train/mfu"])


def test_throughput_leaves_out_evaluation_time(write_config, tmp_path, monkeypatch):
    """samples/s (and MFU) measure training: an evaluation inside a log interval is not counted.
    A fake clock: every training step takes 1 s, every evaluation 100 s."""
    import types

    import src.core.interval as interval_module
    import src.core.trainer as trainer_module
    from src.core.callbacks.base import Callback

    clock = types.SimpleNamespace(now=0.0)
    fake_time = types.SimpleNamespace(perf_counter=lambda: clock.now)
    monkeypatch.setattr(trainer_module, "time", fake_time)
    monkeypatch.setattr(interval_module, "time", fake_time)

    class Clock(Callback):
        def on_step_end(self, trainer, outputs):
            clock.now += 1.0

        def on_validation_start(self, trainer):
            clock.now += 100.0

    cfg, origins = prepare(
        str(
            write_config(
                {
                    "name": "timed",
                    "trainer.max_steps": 10,
                    "trainer.log_every": 5,
                    "trainer.eval_every_n_steps": 5,
                }
            )
        )
    )
    exp = build(cfg, origins)
    original = trainer_module.Trainer.__init__

    def with_clock(self, *args, **kwargs):  # run() builds the trainer: hand it the clock
        original(self, *args, **{**kwargs, "callbacks": [Clock()]})

    monkeypatch.setattr(trainer_module.Trainer, "__init__", with_clock)
    exp.run()
    rows = [r for r in metrics(tmp_path / "runs/timed", drop=()) if "train/samples_per_sec" in r]
    assert [r["step"] for r in rows] == [5, 10]
    assert all(r["train/samples_per_sec"] == pytest.approx(32.0) for r in rows)


def test_fp16_overflow_is_skipped_without_stepping_the_schedule(write_config, tmp_path):
    """A GradScaler overflow (finite loss, gradients out of fp16 range) skips the update and the
    scheduler, lowers the scale, is counted in train/bad_steps, and is no sign of divergence:
    three in a row with max_bad_steps 2 do not stop the run."""
    cfg, origins = prepare(
        str(
            write_config(
                {
                    "task": {"type": "huge_loss_at_steps", "steps": [3, 4, 5]},
                    "trainer.precision": "fp16",
                    "trainer.max_steps": 8,
                    "trainer.log_every": 1,
                    "trainer.max_bad_steps": 2,
                    "scheduler": {"type": "warmup_linear"},
                }
            )
        )
    )
    exp = build(cfg, origins)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "non-finite ... update skipped" warning either
        exp.run()
    scaler, scheduler = exp.trainer.scaler, exp.trainer.scheduler
    rows = {r["step"]: r for r in metrics(tmp_path / "runs/tiny")}
    assert rows[8]["train/bad_steps"] == 3 and "train/loss" not in rows[4]
    assert scheduler.last_epoch == 5  # stepped for the 5 applied updates only
    assert scaler.get_scale() == 2.0**16 * 0.5**3


def test_fp16_weights_with_fp16_precision_is_a_config_error(write_config):
    from src.core.errors import ConfigError

    model = {
        "type": "hf",
        "kind": "causal_lm",
        "dtype": "fp16",
        "config": {"model_type": "gpt2", "n_layer": 1, "n_head": 2, "n_embd": 8},
    }
    with pytest.raises(ConfigError) as err:
        prepare(str(write_config({"model": model, "trainer.precision": "fp16"})))
    assert len(err.value.lines) == 1
    assert "model.dtype: fp16 weights with trainer.precision: fp16" in err.value.lines[0]


SPIKE = {
    "task": {"type": "huge_loss_at_steps", "steps": [40]},
    "trainer.max_steps": 60,
    "trainer.log_every": 1,
    "trainer.loss_spike_sigmas": 6.0,
    "trainer.loss_spike_window": 20,
    "checkpoint.every_n_steps": 10,
}


def test_a_loss_spike_is_skipped_counted_and_nothing_else_is(write_config, tmp_path):
    """Step 40's loss is 10,000 times too large: that update alone is skipped (the weights end
    exactly where a run that discarded step 40 as non-finite ends), counted and logged; none of
    the other 59 steps is taken for a spike. Off by default: the same spike is then applied."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        guarded = run(write_config({**SPIKE, "name": "guarded"}))
    said = [str(w.message) for w in caught if "standard deviations above" in str(w.message)]
    assert len(said) == 1 and said[0].startswith("step 40: loss "), said
    rows = [r for r in metrics(tmp_path / "runs/guarded") if "train/loss" in r]
    assert [r.get("train/spikes_skipped", 0) for r in rows] == [0] * 39 + [1] * 20
    assert "train/bad_steps" not in rows[-1]

    discarded = run(
        write_config(
            {
                **SPIKE,
                "name": "discarded",
                "trainer.loss_spike_sigmas": None,
                "task": {"type": "nan_at_steps", "steps": [40]},
            }
        )
    )
    assert same(params(guarded), params(discarded))

    applied = run(write_config({**SPIKE, "name": "applied", "trainer.loss_spike_sigmas": None}))
    assert not same(params(guarded), params(applied))


def test_the_spike_statistics_resume_exactly(write_config, tmp_path):
    """Stopped at step 30, the resumed run judges step 40 with the restored history."""
    straight = run(write_config({**SPIKE, "name": "straight"}))
    cfg = write_config(
        {**SPIKE, "name": "stopped", "callbacks": [{"type": "signal_at_step", "step": 30}]}
    )
    with pytest.raises(SystemExit):
        run(cfg)
    resumed = run(cfg, "callbacks=[]")
    assert same(params(straight), params(resumed))
    assert metrics(tmp_path / "runs/straight") == metrics(tmp_path / "runs/stopped")
