"""Layers 2 and 3: a single-rank gloo group in-process, and real 2-process runs on CPU through the
real launchers (torchrun, deepspeed), with kill-and-resume, resharding and export."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT
from helpers import metrics, run

pytestmark = pytest.mark.distributed

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

BASE = {"trainer.max_steps": 20, "trainer.log_every": 1, "trainer.eval_every_n_epochs": None,
        "trainer.eval_every_n_steps": 10, "checkpoint.every_n_steps": 5, "checkpoint.keep_last": 2,
        "data.batch_size": 64, "model": {"type": "mlp", "hidden": [64, 32]},
        "optimizer": {"type": "adamw", "lr": 3e-3}}


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(nproc: int, config: Path, *overrides: str, launcher: str = "torchrun",
           expect: int = 0, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": f"{ROOT}:{config.parent}", "OMP_NUM_THREADS": "1"}
    if launcher == "torchrun":
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
               f"--master_port={_port()}", "-m", "src.main"]
    else:
        env["DS_ACCELERATOR"] = "cpu"
        cmd = [sys.executable, "-m", "deepspeed.launcher.runner", f"--num_gpus={nproc}",
               f"--master_port={_port()}", "--module", "src.main"]
    out = subprocess.run(cmd + ["--config", str(config), *overrides], env=env, cwd=cwd,
                         capture_output=True, text=True, timeout=400)
    assert out.returncode == expect, out.stdout[-3000:] + out.stderr[-3000:]
    return out


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
    for k, v in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                 "MASTER_PORT": str(free_port)}.items():
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

    killed = write_config({**BASE, "name": "killed", "strategy": {"type": "ddp"},
                           "imports": ["stop_plugin"],
                           "callbacks": [{"type": "stop_at", "step": 12}]}, "b.yaml")
    launch(2, killed, expect=1)  # torchrun reports the workers' exit 143 as a failure
    ck = tmp_path / "runs/killed/checkpoints"
    # ranks agree on a stop signal asynchronously: they all stop one step after it arrives
    assert (ck / "step_00000013/COMMIT").exists()
    assert sorted(p.name for p in ck.glob("step_*")) == ["step_00000010", "step_00000013"]
    launch(2, killed, "callbacks=[]")
    wa = load_file(str(tmp_path / "runs/straight/checkpoints/step_00000020/model.safetensors"))
    wb = load_file(str(ck / "step_00000020/model.safetensors"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert metrics(tmp_path / "runs/straight") == metrics(tmp_path / "runs/killed")

    from src.core.export import export

    exported = export(ck / "step_00000020", tmp_path / "ddp.safetensors")
    assert set(exported) == {k[len("model."):] for k in wa}


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
    from src.core.export import export

    state = export(tmp_path / "runs/up/checkpoints/step_00000020", tmp_path / "fsdp.safetensors")
    from src.data.info import DatasetInfo
    from src.models.mlp import mlp

    model = mlp(DatasetInfo(num_samples=1, num_classes=10, input_shape=(1, 8, 8)), hidden=[64, 32])
    model.load_state_dict(load_file(str(tmp_path / "fsdp.safetensors")))
    assert len(state) == 6

    # a single-process run resumes the sharded checkpoint too
    single = write_config({**BASE, "name": "up", "trainer.max_steps": 22}, "d.yaml")
    run(single)
    assert losses(tmp_path / "runs/up")[22] > 0


def test_deepspeed_zero2_resumes_after_a_kill_and_exports(write_config, tmp_path, single_losses):
    (tmp_path / "stop_plugin.py").write_text(STOP_PLUGIN)
    ds = {**BASE, "strategy": {"type": "deepspeed", "config": {"zero_optimization": {"stage": 2}}}}
    launch(2, write_config({**ds, "name": "straight"}, "a.yaml"), launcher="deepspeed")
    a = losses(tmp_path / "runs/straight")
    close(single_losses, a, range(1, 21), rel=1e-3)

    killed = write_config({**ds, "name": "killed", "imports": ["stop_plugin"],
                           "callbacks": [{"type": "stop_at", "step": 12}]}, "b.yaml")
    launch(2, killed, launcher="deepspeed", expect=143)
    launch(2, killed, "callbacks=[]", launcher="deepspeed")
    close(a, losses(tmp_path / "runs/killed"), range(13, 21), rel=1e-5)

    step = tmp_path / "runs/straight/checkpoints/step_00000020"
    from src.core.export import export

    ours = export(step, tmp_path / "ds.safetensors")
    script = subprocess.run([sys.executable, str(step / "zero_to_fp32.py"), str(step),
                             str(tmp_path / "z2f"), "--tag", "deepspeed", "--safe_serialization"],
                            capture_output=True, text=True, cwd=tmp_path)
    assert script.returncode == 0, script.stderr[-2000:]
    theirs = {}
    for f in (tmp_path / "z2f").glob("*.safetensors"):
        theirs.update(load_file(str(f)))
    assert all(torch.equal(ours[k], theirs["model." + k]) for k in ours)

    # another world size: a one-line error that says how
    out = launch(1, killed, "trainer.max_steps=24", launcher="deepspeed", expect=2)
    assert "do not reshard on load" in out.stderr and "ds_to_universal" in out.stderr


def test_deepspeed_zero3_trains(write_config, tmp_path, single_losses):
    ds = {**BASE, "trainer.max_steps": 6,
          "strategy": {"type": "deepspeed", "config": {"zero_optimization": {"stage": 3}}}}
    launch(2, write_config({**ds, "name": "z3"}, "a.yaml"), launcher="deepspeed")
    close(single_losses, losses(tmp_path / "runs/z3"), range(1, 7), rel=1e-3)


@pytest.mark.parametrize("changes,expected", [
    ({"data.batch_size": 63}, "data.batch_size: 63 does not divide among 2 processes"),
    ({"strategy": {"type": "deepspeed", "config": {"gradient_clipping": 0.5}},
      "trainer.grad_clip": 1.0},
     "strategy.config.gradient_clipping: 0.5 conflicts with trainer.grad_clip = 1.0"),
])
def test_bad_distributed_input_is_exit_2(write_config, changes, expected):
    cfg = write_config({**BASE, "strategy": {"type": "ddp"}, **changes})
    out = launch(2, cfg, launcher="torchrun", expect=1)
    assert expected in out.stderr
    errors = [line for line in out.stderr.splitlines() if line.startswith("error: ")]
    assert errors and all(expected in e for e in errors)


def test_ssl_method_on_two_ranks(write_config, tmp_path):
    """BYOL (momentum teacher) with the online callbacks under DDP: features gathered for RankMe,
    probe and k-NN counts reduced across ranks."""
    cfg = write_config({**BASE, "name": "ssl", "trainer.max_steps": 6,
                        "trainer.eval_every_n_steps": 6, "strategy": {"type": "ddp"},
                        "model": {"type": "cnn", "channels": [8, 16], "num_classes": 0},
                        "task": {"type": "byol", "proj_dim": 16, "hidden": 32},
                        "callbacks": [{"type": "online_linear_probe"},
                                      {"type": "online_knn", "k": 5}, {"type": "rankme"}]},
                       "a.yaml")
    launch(2, cfg)
    val = [r for r in metrics(tmp_path / "runs/ssl") if "val/rankme" in r][-1]
    assert 0 <= val["val/knn_accuracy"] <= 1 and val["val/rankme"] >= 1
