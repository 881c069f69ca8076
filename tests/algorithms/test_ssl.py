"""The self-supervised methods (SimCLR, MoCo, BYOL, VICReg, DINO): a smoke run each, exact resume of
the momentum methods, and their global state on two ranks."""

import pytest
import torch
from helpers import metrics, params, run, same, stop_and_resume

SSL = {
    "data.batch_size": 64,
    "model": {"type": "cnn", "channels": [8, 16], "num_classes": 0},
    "trainer.max_steps": 6,
    "trainer.eval_every_n_steps": 3,
    "checkpoint.every_n_steps": 3,
    "callbacks": [
        {"type": "online_linear_probe"},
        {"type": "online_knn", "k": 5},
        {"type": "rankme"},
    ],
}


@pytest.mark.parametrize(
    "task",
    [
        {"type": "simclr", "proj_dim": 16, "hidden": 32},
        {"type": "moco", "proj_dim": 16, "hidden": 32, "queue_size": 128},
        {"type": "byol", "proj_dim": 16, "hidden": 32},
        {"type": "vicreg", "proj_dim": 32, "hidden": 32},
        {
            "type": "dino",
            "out_dim": 32,
            "hidden": 32,
            "bottleneck": 16,
            "views": {"type": "multi_crop", "global_views": 2, "local_views": 2},
        },
    ],
    ids=lambda t: t["type"],
)
def test_ssl_methods_smoke(write_config, tmp_path, task):
    """A smoke test (6 steps): each method trains, stays finite and reports its online metrics
    in range. Whether they learn is measured in benchmarks/ssl.py (k-NN accuracy after training)."""
    run(write_config({**SSL, "task": task}))
    rows = metrics(tmp_path / "runs/tiny")
    val = [r for r in rows if "val/knn_accuracy" in r][-1]
    assert 0 <= val["val/knn_accuracy"] <= 1 and 0 <= val["val/probe_accuracy"] <= 1
    assert 1 <= val["val/rankme"] <= 16
    train = [r for r in rows if "train/loss" in r]
    assert all(r["train/loss"] == r["train/loss"] for r in train)  # finite, not NaN
    assert "train/probe_accuracy" in train[-1]


@pytest.mark.parametrize(
    "task",
    [
        {"type": "byol", "proj_dim": 16, "hidden": 32},
        {"type": "moco", "proj_dim": 16, "hidden": 32, "queue_size": 96},
        {
            "type": "dino",
            "out_dim": 16,
            "hidden": 16,
            "bottleneck": 8,
            "use_bn": True,
            "freeze_last_layer_steps": 2,
        },
    ],
    ids=lambda t: t["type"],
)
def test_momentum_methods_resume_exactly(write_config, tmp_path, task):
    """Teachers, queues and centres are checkpointed: 6 straight == 3 + resume to 6 (DINO's
    prototypes, frozen for 2 steps, must not freeze again after the resume)."""
    knn = {"type": "online_knn", "k": 5}
    straight, resumed, a, b = stop_and_resume(
        write_config, tmp_path / "runs", {**SSL, "task": task}, 3, [knn]
    )
    assert same(params(straight), params(resumed))
    assert a == b


def test_ssl_needs_a_feature_backbone(write_config, capsys):
    from src.main import main

    code = main(
        [
            "--config",
            str(
                write_config(
                    {**SSL, "model": {"type": "cnn", "channels": [8]}, "task": {"type": "simclr"}}
                )
            ),
            "--dry-run",
        ]
    )
    assert code == 2 and "set model.num_classes: 0" in capsys.readouterr().err


GLOBAL_STATE_SCRIPT = """
import json, sys
import torch, torch.distributed as dist
from src.core.dataset_info import DatasetInfo
from src.core.registry import MODELS, TASKS
from src.distributed.process_group import GroupCollectives
from src.run.catalog import load_builtins

dist.init_process_group("gloo")
rank = dist.get_rank()
load_builtins()
info = DatasetInfo(num_samples=8, num_classes=10, input_shape=(1, 8, 8))
out = {}
for name, kw in (("moco", {"queue_size": 16, "proj_dim": 4, "hidden": 8}),
                 ("dino", {"out_dim": 8, "hidden": 8, "bottleneck": 4})):
    torch.manual_seed(0)  # the same weights on both ranks, as the trainer builds them
    model = MODELS.build({"type": "mlp", "hidden": [16], "num_classes": 0}, "model", info=info)
    task = TASKS.build({"type": name, **kw}, "task", model=model)
    task.configure(info)
    task.collectives = GroupCollectives(2)  # what the ddp strategy hands the task
    torch.manual_seed(1 + rank)  # each rank its own samples
    x = torch.rand(4, 1, 8, 8)
    views = [x + 0.05 * torch.randn_like(x) for _ in range(2)]
    with torch.no_grad():
        local = task.teacher(torch.cat(views)).mean(0) * 0.1 if name == "dino" else None
    task.training_step({"inputs": x, "labels": torch.zeros(4, dtype=torch.long), "views": views})
    out[name] = {"state": (task.queue if name == "moco" else task.center).tolist(),
                 "local": None if local is None else local.tolist()}
    if name == "moco":
        out[name]["ptr"] = int(task.queue_ptr)
json.dump(out, open(sys.argv[1] + f"/rank{rank}.json", "w"))
dist.destroy_process_group()
"""


@pytest.mark.distributed
def test_dino_centre_and_moco_queue_are_global_on_two_ranks(tmp_path, free_port):
    """DINO's centre follows the teacher's mean over the global batch and MoCo's queue takes every
    rank's keys, as in the reference code: both ranks hold the same state (under DDP a per-rank
    state would be overwritten by rank 0's at the next forward)."""
    import json
    import os
    import subprocess
    import sys

    from conftest import ROOT

    (tmp_path / "script.py").write_text(GLOBAL_STATE_SCRIPT)
    port = free_port
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node=2",
            f"--master_port={port}",
            str(tmp_path / "script.py"),
            str(tmp_path),
        ],
        env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0["moco"]["ptr"] == r1["moco"]["ptr"] == 8  # 4 keys from each rank
    assert r0["moco"]["state"] == r1["moco"]["state"]
    c0, c1 = torch.tensor(r0["dino"]["state"]), torch.tensor(r1["dino"]["state"])
    assert torch.equal(c0, c1)
    expected = (torch.tensor(r0["dino"]["local"]) + torch.tensor(r1["dino"]["local"])) / 2
    assert torch.allclose(c0[0], expected, atol=1e-6)
    assert not torch.allclose(c0[0], torch.tensor(r0["dino"]["local"]), atol=1e-4)
