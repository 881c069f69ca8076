"""Layers 2 and 3: a single-rank gloo group in-process, and real 2-process gloo runs on CPU, with
kill-and-resume, resharding and export.

The ranks are forked from a warm interpreter with the variables torchrun sets (tests/warm.py),
which skips each rank's imports. The real launchers run where they are part of the outcome: the
DDP kill-and-resume under torchrun, the ZeRO-2 resume after a kill under the deepspeed launcher, a
config error under torchrun printed once; tests/distributed/test_faults.py runs torchrun's
restarts, its hang detection and a two-node rendezvous."""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT, port
from helpers import KILL_PLUGIN, STOP_PLUGIN, launch, metrics, run
from safetensors.torch import load_file

pytestmark = pytest.mark.distributed

BASE = {
    "trainer.max_steps": 20,
    "trainer.log_every": 1,
    "trainer.eval_every_n_epochs": None,
    "trainer.eval_every_n_steps": 10,
    "checkpoint.every_n_steps": 5,
    "checkpoint.keep_last": 2,
    "data.batch_size": 64,
    "model": {"type": "mlp", "hidden": [64, 32]},
    "optimizer": {"type": "adamw", "lr": 3e-3},
}


def losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["train/loss"] for r in metrics(run_dir) if "train/loss" in r}


def close(a: dict, b: dict, steps, rel=1e-4) -> None:
    for s in steps:
        assert abs(a[s] - b[s]) <= rel * abs(a[s]), (s, a[s], b[s])


@pytest.fixture(scope="module")
def single_losses(tmp_path_factory):
    """The single-process reference for the equivalence checks."""
    from conftest import make_config

    tmp = tmp_path_factory.mktemp("single")
    run(make_config(tmp, BASE))
    return losses(tmp / "runs/tiny")


def test_single_rank_gloo_group_in_process(write_config, tmp_path, free_port, monkeypatch):
    for k, v in {
        "RANK": "0",
        "LOCAL_RANK": "0",
        "WORLD_SIZE": "1",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port),
    }.items():
        monkeypatch.setenv(k, v)
    exp = run(write_config({**BASE, "strategy": {"type": "ddp"}, "trainer.max_steps": 6}))
    assert exp.strategy.world_size == 1 and torch.distributed.is_initialized()
    assert metrics(tmp_path / "runs/tiny")[-1]["step"] == 6


def test_distributed_strategy_without_launcher_is_exit_2(write_config, capsys):
    from src.main import main

    for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        os.environ.pop(k, None)
    assert main(["--config", str(write_config()), "strategy.type=ddp"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "needs a launcher" in err[0]


def test_ddp_matches_single_and_resumes_after_a_kill(write_config, tmp_path, single_losses):
    (tmp_path / "stop_plugin.py").write_text(STOP_PLUGIN)
    straight = write_config({**BASE, "name": "straight", "strategy": {"type": "ddp"}}, "a.yaml")
    launch(2, straight)
    a = losses(tmp_path / "runs/straight")
    close(single_losses, a, range(1, 21))
    # the kill and the resume under the real torchrun (the other runs are forked warm)

    killed = write_config(
        {
            **BASE,
            "name": "killed",
            "strategy": {"type": "ddp"},
            "imports": ["stop_plugin"],
            "callbacks": [{"type": "stop_at", "step": 12}],
        },
        "b.yaml",
    )
    launch(2, killed, launcher="torchrun", expect=1)  # it reports the workers' 143 as a failure
    ck = tmp_path / "runs/killed/checkpoints"
    # ranks agree on a stop signal asynchronously: they all stop one step after it arrives
    assert (ck / "step_00000013/COMMIT").exists()
    assert sorted(p.name for p in ck.glob("step_*")) == ["step_00000010", "step_00000013"]
    launch(2, killed, "callbacks=[]", launcher="torchrun")
    wa = load_file(str(tmp_path / "runs/straight/checkpoints/step_00000020/model.safetensors"))
    wb = load_file(str(ck / "step_00000020/model.safetensors"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert metrics(tmp_path / "runs/straight") == metrics(tmp_path / "runs/killed")

    from src.run.export import export

    exported = export(ck / "step_00000020", tmp_path / "ddp.safetensors")
    assert set(exported) == {k[len("model.") :] for k in wa}


def test_fsdp_matches_single_and_reshards_both_ways(write_config, tmp_path, single_losses):
    fsdp = {**BASE, "strategy": {"type": "fsdp"}}
    launch(2, write_config({**fsdp, "name": "two"}, "a.yaml"))
    two = losses(tmp_path / "runs/two")
    close(single_losses, two, range(1, 21))

    # 2 ranks -> 1 rank (written by background threads: async_save)
    cfg = write_config({**fsdp, "name": "down", "checkpoint.async_save": True}, "b.yaml")
    launch(2, cfg, "trainer.max_steps=10")
    launch(1, cfg)
    close(two, losses(tmp_path / "runs/down"), range(11, 21))

    # 1 rank -> 2 ranks
    cfg = write_config({**fsdp, "name": "up"}, "c.yaml")
    launch(1, cfg, "trainer.max_steps=10")
    launch(2, cfg)
    close(two, losses(tmp_path / "runs/up"), range(11, 21))

    # consolidated export of a sharded checkpoint, loadable without this project
    from src.run.export import export

    state = export(tmp_path / "runs/up/checkpoints/step_00000020", tmp_path / "fsdp.safetensors")
    from src.core.dataset_info import DatasetInfo
    from src.models.mlp import mlp

    model = mlp(DatasetInfo(num_samples=1, num_classes=10, input_shape=(1, 8, 8)), hidden=[64, 32])
    model.load_state_dict(load_file(str(tmp_path / "fsdp.safetensors")))
    assert len(state) == 6

    # a single-process run resumes the sharded checkpoint too
    single = write_config({**BASE, "name": "up", "trainer.max_steps": 22}, "d.yaml")
    run(single)
    assert losses(tmp_path / "runs/up")[22] > 0


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_every_sample_is_read_once_across_a_kill_and_two_world_sizes(
    write_config, tmp_path, strategy
):
    """data.audit across kill -9 (3 steps past the last checkpoint) and 2 -> 1 -> 2 ranks: the
    steps the kill rolled back are not counted, and every training sample of the first epoch
    (22 steps of 64) is read exactly once, as is every sample read in the second."""
    from src.core.audit import epoch_ids, read_audit

    (tmp_path / "kill_plugin.py").write_text(KILL_PLUGIN)
    cfg = write_config(
        {
            **BASE,
            "strategy": {"type": strategy},
            "data.audit": True,
            "trainer.eval_every_n_steps": None,
            "imports": ["kill_plugin"],
            "callbacks": [{"type": "kill_at", "step": 13}],
        }
    )
    launch(2, cfg, expect=1)
    audit = tmp_path / "runs/tiny/audit"
    assert max(read_audit(audit)) == 13  # steps 11-13 were taken, the last commit is step 10
    launch(1, cfg, "callbacks=[]", "trainer.max_steps=20")
    launch(2, cfg, "callbacks=[]", "trainer.max_steps=30")
    steps = read_audit(audit)
    assert sorted(steps) == list(range(1, 31))
    assert [steps[s]["ranks"] for s in (10, 11, 20, 21)] == [2, 1, 1, 2]
    assert all(len(r["ids"]) == 64 for r in steps.values())
    epochs = epoch_ids(audit)
    assert len(epochs[0]) == 22 * 64 and len(epochs[1]) == 8 * 64
    for ids in epochs.values():
        assert len(set(ids)) == len(ids)
    assert set(epochs[0]) | set(epochs[1]) <= set(range(1438))


def test_shards_with_workers_are_read_once_across_a_kill_and_two_world_sizes(
    write_config, tmp_path
):
    """The digits packed into tar shards, 2 loader workers a rank: kill -9 of 2 ranks at step 13
    (last commit: step 10), resumed on 1 rank to step 30. Every sample of the first epoch is read
    exactly once, the rolled-back steps are not counted, and the second epoch repeats nothing."""
    from helpers import digits_folder

    from src.core.audit import epoch_ids, read_audit
    from src.main import main

    digits_folder(tmp_path / "digits")
    assert (
        main(
            [
                "pack",
                "--from",
                str(tmp_path / "digits"),
                "--out",
                str(tmp_path / "sh"),
                "--shard-size",
                "100KB",
            ]
        )
        == 0
    )
    (tmp_path / "kill_plugin.py").write_text(KILL_PLUGIN)
    cfg = write_config(
        {
            **BASE,
            "data": {
                "type": "shards",
                "paths": str(tmp_path / "sh"),
                "image_size": 8,
                "channels": 1,
                "val_fraction": 0.2,
                "batch_size": 64,
                "num_workers": 2,
                "audit": True,
            },
            "strategy": {"type": "ddp"},
            "trainer.eval_every_n_steps": None,
            "imports": ["kill_plugin"],
            "callbacks": [{"type": "kill_at", "step": 13}],
        }
    )
    launch(2, cfg, expect=1)
    audit = tmp_path / "runs/tiny/audit"
    assert max(read_audit(audit)) == 13
    launch(1, cfg, "callbacks=[]", "trainer.max_steps=30")
    steps = read_audit(audit)
    assert sorted(steps) == list(range(1, 31))
    assert [steps[s]["ranks"] for s in (10, 11, 30)] == [2, 1, 1]
    epochs = epoch_ids(audit)
    assert len(epochs[0]) == 22 * 64 and len(epochs[1]) == 8 * 64
    for ids in epochs.values():
        assert len(set(ids)) == len(ids)


def test_deepspeed_zero2_resumes_after_a_kill_and_exports(write_config, tmp_path, single_losses):
    (tmp_path / "stop_plugin.py").write_text(STOP_PLUGIN)
    ds = {**BASE, "strategy": {"type": "deepspeed", "config": {"zero_optimization": {"stage": 2}}}}
    launch(2, write_config({**ds, "name": "straight"}, "a.yaml"))  # the launcher: below
    a = losses(tmp_path / "runs/straight")
    close(single_losses, a, range(1, 21), rel=1e-3)

    killed = write_config(
        {
            **ds,
            "name": "killed",
            "imports": ["stop_plugin"],
            "callbacks": [{"type": "stop_at", "step": 12}],
        },
        "b.yaml",
    )
    out = launch(2, killed, expect=1)
    assert out.returncodes == [143, 143]  # each rank saved, then exited as SIGTERM asks
    launch(2, killed, "callbacks=[]", launcher="deepspeed")  # the deepspeed launcher resumes it
    close(a, losses(tmp_path / "runs/killed"), range(13, 21), rel=1e-5)

    step = tmp_path / "runs/straight/checkpoints/step_00000020"
    from src.run.export import export

    ours = export(step, tmp_path / "ds.safetensors")
    script = subprocess.run(
        [
            sys.executable,
            str(step / "zero_to_fp32.py"),
            str(step),
            str(tmp_path / "z2f"),
            "--tag",
            "deepspeed",
            "--safe_serialization",
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert script.returncode == 0, script.stderr[-2000:]
    theirs = {}
    for f in (tmp_path / "z2f").glob("*.safetensors"):
        theirs.update(load_file(str(f)))
    assert all(torch.equal(ours[k], theirs["model." + k]) for k in ours)


@pytest.mark.parametrize("stage", [1, 2])
def test_deepspeed_resumes_at_another_world_size_and_back(
    write_config, tmp_path, single_losses, stage
):
    """2 ranks -> 1 -> 2: each change of world size converts the ZeRO shards to DeepSpeed's
    universal format once (kept beside them) and loads them with the optimizer state, so the
    losses go on as in one uninterrupted process and the step count continues. Stage 1 runs the
    same conversion and DeepSpeed optimizer class as stage 2: it goes 2 -> 1 only."""
    cfg = write_config(
        {
            **BASE,
            "strategy": {"type": "deepspeed", "config": {"zero_optimization": {"stage": stage}}},
            "checkpoint.keep_last": 5,
        }
    )
    launch(2, cfg, "trainer.max_steps=8")
    ck = tmp_path / "runs/tiny/checkpoints"
    if stage == 1:
        launch(1, cfg)
    else:
        launch(1, cfg, "trainer.max_steps=14")
        launch(2, cfg)
        assert (ck / "step_00000014/deepspeed_universal").is_dir()
    assert (ck / "step_00000008/deepspeed_universal").is_dir()
    got = losses(tmp_path / "runs/tiny")
    assert sorted(got) == list(range(1, 21))
    close(single_losses, got, range(1, 21), rel=1e-3)


def test_deepspeed_zero3_trains(write_config, tmp_path, single_losses):
    ds = {
        **BASE,
        "trainer.max_steps": 6,
        "strategy": {"type": "deepspeed", "config": {"zero_optimization": {"stage": 3}}},
    }
    launch(2, write_config({**ds, "name": "z3"}, "a.yaml"))
    close(single_losses, losses(tmp_path / "runs/z3"), range(1, 7), rel=1e-3)
    # ZeRO-3 does not convert (DeepSpeed's universal load loses state going 1 -> 2): one line
    out = launch(1, write_config({**ds, "name": "z3"}, "a.yaml"), "trainer.max_steps=8", expect=1)
    assert out.returncodes == [2], out.stderr[-2000:]
    assert "ZeRO-3 shards resume only at the world size that wrote them" in out.stderr


@pytest.mark.parametrize(
    "changes,expected",
    [
        ({"data.batch_size": 63}, "data.batch_size: 63 does not divide among 2 processes"),
        (
            {"strategy": {"type": "fsdp", "cpu_offload": True}},
            "strategy.cpu_offload: offloads a GPU",
        ),
        (
            {
                "strategy": {
                    "type": "deepspeed",
                    "config": {
                        "zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}
                    },
                },
                "optimizer.type": "sgd",
            },
            "DeepSpeed offloads only its own CPU Adam",
        ),
        (
            {
                "strategy": {"type": "deepspeed", "config": {"gradient_clipping": 0.5}},
                "trainer.grad_clip": 1.0,
            },
            "strategy.config.gradient_clipping: 0.5 conflicts with trainer.grad_clip = 1.0",
        ),
        (
            {
                "strategy": {"type": "deepspeed", "config": {"zero_optimization": {"stage": 2}}},
                "trainer.loss_spike_sigmas": 6.0,
            },
            "trainer.loss_spike_sigmas: not available with DeepSpeed ZeRO",
        ),
    ],
)
def test_bad_distributed_input_is_exit_2(write_config, changes, expected):
    """Each rank exits 2 with one line (torchrun then exits 1: test_faults runs it)."""
    cfg = write_config({**BASE, "strategy": {"type": "ddp"}, **changes})
    out = launch(2, cfg, expect=1)
    assert out.returncodes == [2, 2], out.stderr[-2000:]
    assert expected in out.stderr
    errors = [line for line in out.stderr.splitlines() if line.startswith("error: ")]
    assert errors and all(expected in e for e in errors)


def test_ssl_method_on_two_ranks(write_config, tmp_path):
    """BYOL (momentum teacher) with the online callbacks under DDP: features gathered for RankMe,
    probe and k-NN counts reduced across ranks."""
    cfg = write_config(
        {
            **BASE,
            "name": "ssl",
            "trainer.max_steps": 6,
            "trainer.eval_every_n_steps": 6,
            "strategy": {"type": "ddp"},
            "model": {"type": "cnn", "channels": [8, 16], "num_classes": 0},
            "task": {"type": "byol", "proj_dim": 16, "hidden": 32},
            "callbacks": [
                {"type": "online_linear_probe"},
                {"type": "online_knn", "k": 5},
                {"type": "rankme"},
            ],
        },
        "a.yaml",
    )
    launch(2, cfg)
    val = [r for r in metrics(tmp_path / "runs/ssl") if "val/rankme" in r][-1]
    assert 0 <= val["val/knn_accuracy"] <= 1 and val["val/rankme"] >= 1


CLIP_AND_EVAL = {
    **BASE,
    "trainer.max_steps": 3,
    "trainer.eval_every_n_steps": 3,
    "trainer.grad_clip": 1e-3,
    "checkpoint.every_n_steps": None,
    "optimizer": {"type": "sgd", "lr": 1.0, "weight_decay": 0.0},
    # 359 validation samples, one per rank and step: 180 steps on rank 0, 179 on
    # rank 1 before padding, so a sharded forward would wait for its peer forever
    "data.eval_batch_size": 2,
}


@pytest.fixture(scope="module")
def clipped_single(tmp_path_factory):
    """One process: weights before and after 3 clipped SGD steps, and the validation metrics."""
    from conftest import make_config
    from helpers import params

    from src.run.experiment import build, prepare

    tmp = tmp_path_factory.mktemp("clip_single")
    cfg, origins = prepare(str(make_config(tmp, CLIP_AND_EVAL)))
    exp = build(cfg, origins)
    before = params(exp)
    exp.run()
    return before, params(exp), metrics(tmp / "runs/tiny")[-1]


@pytest.mark.parametrize(
    "strategy",
    [
        {"type": "ddp", "timeout_s": 120},
        {"type": "fsdp", "timeout_s": 120},
        {"type": "deepspeed", "timeout_s": 120, "config": {"zero_optimization": {"stage": 3}}},
    ],
)
def test_clipping_and_uneven_evaluation_on_two_ranks(
    write_config, tmp_path, clipped_single, strategy
):
    """Each update is at most lr x max_norm under every strategy, and evaluation with one rank a
    batch short neither hangs nor counts a padded sample: the metrics are one process's."""
    before, single_after, single_val = clipped_single
    cfg = write_config({**CLIP_AND_EVAL, "strategy": strategy})
    launch(2, cfg)
    step = sorted((tmp_path / "runs/tiny/checkpoints").glob("step_*"))[-1]
    from src.run.export import export

    after = {f"model.{k}": v for k, v in export(step, tmp_path / "w.safetensors").items()}
    moved = torch.cat([(after[k] - before[k]).flatten() for k in before]).norm()
    assert 0 < float(moved) <= 3e-3 * (1 + 1e-4)  # three steps of at most 1e-3 each
    assert all(torch.allclose(after[k], single_after[k], atol=1e-6) for k in before)
    val = metrics(tmp_path / "runs/tiny")[-1]
    assert val["val/accuracy"] == pytest.approx(single_val["val/accuracy"], abs=1e-6)
    assert val["val/loss"] == pytest.approx(single_val["val/loss"], rel=1e-5)


NAN_PLUGIN = '''
from src.algorithms.classification import Classification
from src.core.registry import TASKS

@TASKS.register("nan_loss_at")
class NaNLossAt(Classification):
    """Classification whose loss (and so every gradient) is NaN on the given training call."""
    def __init__(self, model, call: int = 3):
        super().__init__(model)
        self.at, self.calls = call, 0
    def training_step(self, batch):
        out = super().training_step(batch)
        self.calls += 1
        if self.calls == self.at:
            out["loss"] = out["loss"] * float("nan")
        return out
'''


@pytest.mark.skipif(not Path("/dev/shm").is_dir(), reason="no /dev/shm")
def test_deepspeed_on_cpu_leaves_no_shared_memory_and_survives_a_stale_buffer(write_config):
    """DeepSpeed's CPU all-reduce makes a 69 MB /dev/shm file per rank and run and never removes
    it: repeated runs filled the memory, and a file left on a reused port (a killed run's) was
    mapped by the next run as if it were a live rank's. Each rank now removes its own."""
    p = port()
    shm = Path("/dev/shm")
    stale = shm / f"deepspeed_allreduce_buffer_{os.getuid()}_127.0.0.1_{p}_1"
    stale.write_bytes(b"\0" * 4096)  # a killed run's buffer of rank 1, on this run's port
    ds = {"type": "deepspeed", "config": {"zero_optimization": {"stage": 1}}}
    launch(
        2,
        write_config({**BASE, "trainer.max_steps": 2, "strategy": ds}),
        master_port=p,
    )
    assert not [f.name for f in shm.glob(f"deepspeed_allreduce_buffer_*_{p}_*")]


@pytest.fixture(scope="module")
def nan_single(tmp_path_factory):
    """The config with a NaN loss on the third call, and one process's metric rows by step."""
    from conftest import make_config

    tmp = tmp_path_factory.mktemp("nan_single")
    (tmp / "nan_plugin.py").write_text(NAN_PLUGIN)
    common = {
        **BASE,
        "trainer.max_steps": 8,
        "imports": [str(tmp / "nan_plugin.py")],
        "task": {"type": "nan_loss_at", "call": 3},
    }
    run(make_config(tmp, {**common, "name": "one"}))
    return common, {r["step"]: r for r in metrics(tmp / "runs/one") if "train/lr" in r}


@pytest.mark.parametrize("stage", [0, 2])
def test_deepspeed_skips_a_nan_step_cleanly_and_logs_the_norm(
    write_config, tmp_path, nan_single, stage
):
    """A non-finite step is skipped by DeepSpeed's own engine, so its gradient does not linger in
    ZeRO's buffers: the run continues exactly as one process does, and the logged gradient norm
    is a number (ZeRO stage 0 computes none of its own)."""
    common, one = nan_single
    ds = {"type": "deepspeed", "config": {"zero_optimization": {"stage": stage}}}
    launch(2, write_config({**common, "name": "two", "strategy": ds}, "b.yaml"))
    two = {r["step"]: r for r in metrics(tmp_path / "runs/two") if "train/lr" in r}
    assert sorted(one) == sorted(two) == list(range(1, 9))
    for step in range(1, 9):
        a, b = one[step], two[step]
        assert a.get("train/bad_steps", 0) == b.get("train/bad_steps", 0) == (step >= 3)
        if step != 3:  # step 3 was skipped: it logs no loss or norm of its own
            assert b["train/loss"] == pytest.approx(a["train/loss"], rel=1e-3)
            assert b["train/grad_norm"] == pytest.approx(a["train/grad_norm"], rel=1e-3)


def test_deepspeed_bf16_trains_a_batchnorm_cnn_and_offloads_adam(write_config, tmp_path):
    """bf16 under DeepSpeed: the inputs take the engine's dtype and BatchNorm's statistics follow
    the parameters; ZeRO-Offload steps DeepSpeed's CPU Adam built from the AdamW section."""
    cfg = write_config(
        {
            **BASE,
            "trainer.max_steps": 4,
            "trainer.precision": "bf16",
            "model": {"type": "cnn", "channels": [8, 16]},
            "strategy": {
                "type": "deepspeed",
                "config": {
                    "zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}
                },
            },
        }
    )
    launch(2, cfg)
    rows = [r for r in metrics(tmp_path / "runs/tiny") if "train/loss" in r]
    assert len(rows) == 4 and all(math.isfinite(r["train/grad_norm"]) for r in rows)
    assert rows[-1]["train/loss"] < rows[0]["train/loss"]


def test_fsdp_ema_resumes_from_whole_tensors(write_config, tmp_path):
    """EMA weights under FSDP are shards; the checkpoint holds them whole, so a resumed 2-rank
    run evaluates the same averaged weights as one uninterrupted process."""
    ema = {**BASE, "callbacks": [{"type": "ema", "decay": 0.8}]}
    run(write_config({**ema, "name": "one"}, "a.yaml"))
    cfg = write_config({**ema, "name": "two", "strategy": {"type": "fsdp"}}, "b.yaml")
    launch(2, cfg, "trainer.max_steps=10")
    launch(2, cfg)
    one, two = (
        [r for r in metrics(tmp_path / f"runs/{n}") if "val/loss" in r] for n in ("one", "two")
    )
    assert [r["step"] for r in two] == [10, 20]
    assert two[-1]["val/loss"] == pytest.approx(one[-1]["val/loss"], rel=1e-4)


STALL_PLUGIN = '''
import time
from src.core.callbacks.base import Callback
from src.core.registry import CALLBACKS

@CALLBACKS.register("stall_rank0")
class StallRank0(Callback):
    """Rank 0 stops answering for a while, as a hung data loader or a lost node would."""
    def __init__(self, seconds: float):
        self.seconds = seconds
    def on_step_end(self, trainer, outputs):
        if trainer.step == 2 and trainer.strategy.rank == 0:
            time.sleep(self.seconds)
'''


def test_a_rank_that_stops_answering_fails_the_run_in_one_line(write_config, tmp_path):
    """strategy.timeout_s bounds every wait for another rank: the run ends with one line per
    rank instead of hanging for the default half hour."""
    (tmp_path / "stall_plugin.py").write_text(STALL_PLUGIN)
    cfg = write_config(
        {
            **BASE,
            "imports": ["stall_plugin"],
            "strategy": {"type": "ddp", "timeout_s": 3},
            "callbacks": [{"type": "stall_rank0", "seconds": 10}],
        }
    )
    out = launch(2, cfg, expect=1)
    errors = [line for line in out.stderr.splitlines() if line.startswith("error: rank")]
    assert errors and all("strategy.timeout_s = 3" in e for e in errors), out.stderr[-3000:]
    assert not (tmp_path / "runs/tiny/checkpoints/step_00000020").exists()


def test_fsdp_language_model_samples_after_evaluation(write_config, tmp_path):
    """Sampling after an evaluation runs outside any step: under FSDP the task's generate is a
    registered forward (the root's sharded weights are gathered) and ranks stay in lockstep."""
    cfg = write_config(
        {
            "name": "lm",
            "trainer.max_steps": 2,
            "trainer.eval_every_n_steps": 2,
            "trainer.eval_every_n_epochs": None,
            "data": {
                "type": "text",
                "paths": ["stdlib:json"],
                "vocab_size": 512,
                "block_size": 64,
                "val_fraction": 0.3,
                "batch_size": 8,
            },
            "model": {
                "type": "hf",
                "kind": "causal_lm",
                "config": {
                    "model_type": "gpt2",
                    "n_layer": 2,
                    "n_head": 2,
                    "n_embd": 32,
                    "n_positions": 64,
                },
            },
            "task": {"type": "causal_lm", "samples": 2, "max_new_tokens": 8},
            "strategy": {"type": "fsdp", "timeout_s": 120},
        }
    )
    launch(2, cfg)
    rows = metrics(tmp_path / "runs/lm", drop=())
    texts = [r for r in rows if "text/sample_0" in r]
    assert texts and texts[-1]["step"] == 2 and any("val/bpb" in r for r in rows)


CNN = {
    **BASE,
    "model": {"type": "cnn", "channels": [8, 16], "dropout": 0.0},
    "trainer.max_steps": 12,
    "trainer.eval_every_n_steps": 12,
}


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_sync_batchnorm_makes_a_cnn_match_one_process(strategy, write_config, tmp_path):
    """BatchNorm statistics over the global batch: 2 ranks train the CNN as one process does.

    Tolerance 1e-4 relative: the same sums over the same 64 samples, added in another order
    (two 32-sample halves, then across ranks), differ by ~1e-7 per step; 12 Adam steps keep that
    well under 1e-4. Without the flag each rank normalises by its own 32 samples and the losses
    part by far more (checked below), so the tolerance tells the two apart.
    """
    from conftest import make_config

    ref = tmp_path / "single"
    ref.mkdir()
    run(make_config(ref, CNN))
    one = losses(ref / "runs/tiny")
    cfg = write_config(CNN)
    launch(2, cfg, f"strategy={{type: {strategy}, sync_batchnorm: true}}", "name=synced")
    close(one, losses(tmp_path / "runs/synced"), range(1, 13))
    if strategy == "ddp":
        launch(2, cfg, "strategy.type=ddp", "name=local")
        apart = losses(tmp_path / "runs/local")
        assert max(abs(apart[s] - one[s]) / one[s] for s in range(2, 13)) > 1e-3


def test_a_config_error_under_torchrun_is_printed_once(write_config, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node=2",
            f"--master_port={port()}",
            "-m",
            "src.main",
            "--config",
            str(write_config()),
            "optimizer.lr=-1",
            "strategy.type=ddp",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode != 0
    errors = [line for line in out.stderr.splitlines() if line.startswith("error: ")]
    assert errors == [
        "error: override 'optimizer.lr=-1': optimizer.lr: Input should be greater than 0 (got -1)"
    ], out.stderr
    assert not (tmp_path / "runs").exists()


FULL_DISK_PLUGIN = '''
import errno, os
from src.distributed.base import Strategy

real = Strategy._save_small

def _save_small(self, directory, trainer_state, rank_state):
    """Rank 1's disk is full when step 15 is saved."""
    if self.rank == 1 and directory.name == "step_00000015":
        raise OSError(errno.ENOSPC, "No space left on device", str(directory / "rank_00001.pt"))
    return real(self, directory, trainer_state, rank_state)

Strategy._save_small = _save_small
'''


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_a_save_failing_on_one_rank_stops_every_rank_alike(write_config, tmp_path, strategy):
    """Rank 0 wrote its part, rank 1 could not: both ranks stop with one line (no rank waits for
    the other), the partial folder is gone and latest stays on step 10; the run then finishes."""
    (tmp_path / "full_disk.py").write_text(FULL_DISK_PLUGIN)
    cfg = write_config(
        {
            **BASE,
            "strategy": {"type": strategy},
            "imports": ["full_disk"],
            "checkpoint.keep_last": 3,
        }
    )
    out = launch(2, cfg, expect=1)
    # each rank says it once (the two ranks share one stderr: count sayings, not lines, as
    # another process's output may precede a line without a newline of its own)
    errors = re.findall(
        r"checkpoint not saved: (No space left on device|another rank failed)", out.stderr
    )
    assert sorted(errors) == ["No space left on device", "another rank failed"], out.stderr[-3000:]
    ck = tmp_path / "runs/tiny/checkpoints"
    assert not (ck / "step_00000015").exists() and (ck / "latest").read_text() == "step_00000010"
    (tmp_path / "full_disk.py").write_text("")  # space is back
    launch(2, cfg)
    assert metrics(tmp_path / "runs/tiny")[-1]["step"] == 20


SPIKE_PLUGIN = '''
import torch.distributed as dist
from src.algorithms.classification import Classification
from src.core.registry import TASKS

@TASKS.register("rank0_loss_at_step")
class Rank0LossAtStep(Classification):
    """Rank 0's loss at the given step is multiplied by 1e4 (or NaN); rank 1's is not."""
    def __init__(self, model, step: int = 30, nan: bool = False):
        super().__init__(model)
        self.at, self.factor, self.calls = step, float("nan") if nan else 1e4, 0
    def training_step(self, batch):
        out = super().training_step(batch)
        self.calls += 1
        if self.calls == self.at and dist.get_rank() == 0:
            out["loss"] = out["loss"] * self.factor
        return out
'''


def test_a_loss_spike_on_one_rank_is_skipped_by_every_rank(write_config, tmp_path):
    """The spike is judged on the loss averaged over ranks: both ranks skip step 30 alike, and
    the weights end where a run whose rank 0 saw a NaN at step 30 (skipped by both) ends."""
    (tmp_path / "spike_plugin.py").write_text(SPIKE_PLUGIN)
    common = {
        **BASE,
        "trainer.max_steps": 40,
        "checkpoint.every_n_steps": 40,
        "strategy": {"type": "ddp"},
        "imports": ["spike_plugin"],
        "trainer.loss_spike_window": 20,
    }
    launch(
        2,
        write_config(
            {
                **common,
                "name": "spike",
                "trainer.loss_spike_sigmas": 6.0,
                "task": {"type": "rank0_loss_at_step"},
            },
            "a.yaml",
        ),
    )
    rows = [r for r in metrics(tmp_path / "runs/spike") if "train/loss" in r]
    assert rows[-1]["train/spikes_skipped"] == 1 and "train/bad_steps" not in rows[-1]
    launch(
        2,
        write_config(
            {**common, "name": "nan", "task": {"type": "rank0_loss_at_step", "nan": True}}, "b.yaml"
        ),
    )
    a = load_file(str(tmp_path / "runs/spike/checkpoints/step_00000040/model.safetensors"))
    b = load_file(str(tmp_path / "runs/nan/checkpoints/step_00000040/model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
