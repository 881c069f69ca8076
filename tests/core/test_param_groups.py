"""Parameter groups, freezing, layer-wise decay and several optimizers, by name patterns."""

import json
import math
import signal

import pytest
import torch
from helpers import LM_DATA, STOP_PLUGIN, launch, metrics, run

from src.core.errors import ConfigError
from src.run.experiment import build, prepare

VIT = {
    "type": "timm",
    "name": "vit_tiny_patch16_224",
    "img_size": 8,
    "patch_size": 2,
    "depth": 3,
    "embed_dim": 32,
    "num_heads": 2,
}
BACKBONE = r"^model\.(blocks|patch_embed|cls_token|pos_embed)"
GROUPS = {
    "model": VIT,
    "trainer.max_steps": 12,
    "trainer.log_every": 1,
    "checkpoint.every_n_steps": 6,
    "scheduler": {"type": "warmup_cosine", "warmup_steps": 3},
    "optimizer": {
        "type": "adamw",
        "lr": 2e-3,
        "weight_decay": 0.05,
        "groups": [
            {"match": BACKBONE, "lr_mult": 0.1},
            {"match": r"(\.bias|norm\d*\.weight)$", "weight_decay": 0.0},
        ],
    },
}


def lr_rows(run_dir):
    return [r for r in metrics(run_dir) if "train/lr/default" in r]


def check_groups(exp, run_dir):
    """Every trainable parameter in exactly one group; backbone lr 0.1x the head's at every
    logged step; biases and norm weights without weight decay."""
    names = {id(p): n for n, p in exp.task.named_parameters()}
    seen = [names[id(p)] for g in exp.optimizer.param_groups for p in g["params"]]
    trainable = [n for n, p in exp.task.named_parameters() if p.requires_grad]
    assert sorted(seen) == sorted(trainable) and len(set(seen)) == len(seen)
    for g in exp.optimizer.param_groups:
        for p in g["params"]:
            n = names[id(p)]
            if n.endswith(".bias") or "norm" in n.rsplit(".", 2)[-2] or p.ndim <= 1:
                assert g["weight_decay"] == 0.0, n
            else:
                assert g["weight_decay"] == 0.05, n
    rows = lr_rows(run_dir)
    assert len(rows) == 12 and min(r["train/lr/default"] for r in rows[:-1]) > 0
    for r in rows:
        head, back = r["train/lr/default"], r["train/lr/groups.0"]
        assert back == pytest.approx(0.1 * head, rel=1e-12, abs=0)
        assert r["train/lr/groups.0+groups.1"] == back and r["train/lr/groups.1"] == head
    return rows


def test_pattern_groups_on_a_vit_hold_at_every_step_and_after_resume(write_config, tmp_path):
    whole = run(write_config(GROUPS, "whole.yaml"))
    whole_rows = check_groups(whole, tmp_path / "runs/tiny")
    table = json.loads((tmp_path / "runs/tiny/param_groups.json").read_text())
    assert {r["group"] for r in table} == {"default", "groups.0", "groups.1", "groups.0+groups.1"}
    assert sum(r["parameters"] for r in table) == whole.derived["trainable_parameters"]

    stopped = {**GROUPS, "name": "stopped", "callbacks": [{"type": "signal_at_step", "step": 7}]}
    with pytest.raises(SystemExit):
        run(write_config(stopped, "stopped.yaml"))
    resumed = run(write_config({**GROUPS, "name": "stopped"}, "resumed.yaml"))
    check_groups(resumed, tmp_path / "runs/stopped")
    assert lr_rows(tmp_path / "runs/stopped")[-1] == whole_rows[-1]
    for k, v in whole.task.state_dict().items():
        torch.testing.assert_close(resumed.task.state_dict()[k], v, rtol=0, atol=0)


def test_layer_decay_scales_each_block(write_config):
    cfg, o = prepare(
        str(
            write_config(
                {"model": VIT, "optimizer": {"type": "adamw", "lr": 1.0, "layer_decay": 0.5}}
            )
        )
    )
    exp = build(cfg, o)
    names = {id(p): n for n, p in exp.task.named_parameters()}
    for g in exp.optimizer.param_groups:
        for p in g["params"]:
            n = names[id(p)]
            layer = (
                int(n.split(".")[2]) + 1
                if n.startswith("model.blocks.")
                else 0
                if n.split(".")[1] in ("cls_token", "pos_embed", "patch_embed")
                else 4
            )
            assert g["lr"] == pytest.approx(0.5 ** (4 - layer), rel=1e-12), n


def test_freeze_keeps_weights_and_leaves_them_out_of_the_optimizer(write_config):
    frozen = [r"^model\.patch_embed\.", r"^model\.blocks\.0\."]
    exp = run(write_config({"model": VIT, "freeze": frozen, "trainer.max_steps": 3}))
    cfg, o = prepare(str(write_config({"model": VIT}, "fresh.yaml")))
    fresh = build(cfg, o).task.state_dict()  # the same seed builds the same initial weights
    in_optimizer = {id(p) for g in exp.optimizer.param_groups for p in g["params"]}
    for n, p in exp.task.named_parameters():
        frozen = n.startswith(("model.patch_embed.", "model.blocks.0."))
        assert (id(p) in in_optimizer) != frozen, n
        assert torch.equal(p.detach(), fresh[n]) == frozen, n


@pytest.mark.parametrize(
    "changes, expected",
    [
        (
            {"optimizer.groups": [{"match": "^model\\.nothing", "lr_mult": 2}]},
            "optimizer.groups.0.match: '^model\\\\.nothing' matches no trainable parameter",
        ),
        ({"freeze": ["^encoder\\."]}, "freeze.0: '^encoder\\\\.' matches no parameter"),
        ({"optimizer.groups": [{"lr_mult": 2}]}, "optimizer.groups.0: needs 'match'"),
        (
            {"optimizer.groups": [{"match": "(", "lr_mult": 2}]},
            "optimizer.groups.0.match: '(' is not a regular expression",
        ),
        (
            {"optimizer.groups": [{"match": "a", "momentun": 0.9}]},
            "optimizer.groups.0.momentun: unknown key",
        ),
        ({"optimizer.layer_decay": 0.75}, "optimizer.layer_decay: found no numbered blocks"),
        (
            {
                "optimizers": [{"type": "sgd", "lr": 0.1}, {"type": "adamw"}],
                "optimizer": {"type": "adamw"},
            },
            "optimizers.0: needs `match`",
        ),
        (
            {
                "optimizers": [{"type": "sgd", "lr": 0.1, "match": "^model\\.net\\.1\\."}],
                "optimizer": {"type": "adamw"},
            },
            "optimizers: no entry matches model.net.3.weight",
        ),
        (
            {
                "optimizers": [
                    {"type": "sgd", "lr": 0.1, "match": "^model\\.net\\.1\\."},
                    {"type": "adamw"},
                ]
            },
            "optimizers: replaces `optimizer`",
        ),
        (
            {
                "optimizers": [
                    {"type": "adamw", "match": "x", "scheduler": {"type": "cosine"}},
                    {"type": "adamw"},
                ],
                "optimizer": {"type": "adamw"},
            },
            "optimizers.0.scheduler.type: unknown scheduler 'cosine'",
        ),
    ],
)
def test_bad_patterns_are_one_line_exit_2(write_config, cli, changes, expected):
    out = cli("--config", str(write_config(changes)), "--dry-run")
    assert out.returncode == 2, out.stderr
    assert expected in out.stderr and "Traceback" not in out.stderr, out.stderr


def test_deepspeed_takes_one_optimizer(write_config):
    path = write_config(
        {
            "strategy": {"type": "deepspeed"},
            "optimizers": [
                {"type": "sgd", "lr": 0.1, "match": "^model\\.net\\.1\\."},
                {"type": "adamw"},
            ],
            "optimizer": {"type": "adamw"},
        }
    )
    with pytest.raises(ConfigError, match="DeepSpeed steps one optimizer"):
        prepare(str(path))


TWO = {
    "model": {"type": "mlp", "hidden": [64, 32]},
    "data.batch_size": 64,
    "trainer.max_steps": 20,
    "trainer.log_every": 1,
    "checkpoint.every_n_steps": 5,
    "optimizer": {"type": "adamw"},
    "optimizers": [
        {
            "match": r"^model\.net\.1\.",
            "type": "sgd",
            "lr": 0.05,
            "momentum": 0.9,
            "scheduler": {"type": "warmup_linear", "warmup_steps": 4},
        },
        {"type": "adamw", "lr": 3e-3, "groups": [{"match": r"\.bias$", "lr_mult": 0.5}]},
    ],
    "scheduler": {"type": "warmup_cosine", "warmup_steps": 2},
}


def two_lrs(row):
    return row["train/lr/optimizers.0/default"], row["train/lr/optimizers.1/default"]


def test_two_optimizers_by_pattern_train_and_resume_exactly(write_config, tmp_path):
    whole = run(write_config(TWO, "whole.yaml"))
    rows = lr_rows_two(tmp_path / "runs/tiny")
    sgd, adamw = whole.optimizer.optimizers
    assert isinstance(sgd, torch.optim.SGD) and isinstance(adamw, torch.optim.AdamW)
    for r in rows:  # each follows its own schedule: linear decay vs cosine, from its own base
        s = r["step"]
        sgd_lr, adam_lr = two_lrs(r)
        assert sgd_lr == pytest.approx(
            0.05 * ((s + 1) / 4 if s < 4 else 1 - (s - 4) / 16), abs=1e-12
        )
        cos = 0.5 * (1 + math.cos(math.pi * min(1.0, (s - 2) / 18))) if s >= 2 else (s + 1) / 2
        assert adam_lr == pytest.approx(3e-3 * cos, abs=1e-12)
        assert r["train/lr/optimizers.1/groups.0+no_decay"] == pytest.approx(
            0.5 * adam_lr, rel=1e-12
        )

    stopped = {
        **TWO,
        "name": "stopped",
        "callbacks": [{"type": "signal_at_step", "step": 8, "signum": int(signal.SIGINT)}],
    }
    with pytest.raises(SystemExit):
        run(write_config(stopped, "stopped.yaml"))
    resumed = run(write_config({**TWO, "name": "stopped"}, "resumed.yaml"))
    assert lr_rows_two(tmp_path / "runs/stopped")[-1] == rows[-1]
    for k, v in whole.task.state_dict().items():
        torch.testing.assert_close(resumed.task.state_dict()[k], v, rtol=0, atol=0)


def lr_rows_two(run_dir):
    return [r for r in metrics(run_dir) if "train/lr/optimizers.0/default" in r]


@pytest.mark.parametrize("strategy", ["fsdp", "ddp"])
def test_two_optimizers_and_groups_on_two_ranks_match_one_process(write_config, tmp_path, strategy):
    """FSDP2 builds the groups on its sharded parameters (DDP on the replicas): the losses and
    each group's lr match one process, and a stop and resume on two ranks continues exactly."""
    single = tmp_path / "single"
    single.mkdir()
    from conftest import make_config

    run(make_config(single, TWO))
    ref = {r["step"]: r for r in metrics(single / "runs/tiny") if "train/loss" in r}
    plugin = tmp_path / "stop_plugin.py"
    plugin.write_text(STOP_PLUGIN)
    dist = {
        **TWO,
        "strategy": {"type": strategy},
        "imports": ["stop_plugin"],
        "callbacks": [{"type": "stop_at", "step": 8}],
    }
    launch(2, write_config(dist, "dist.yaml"), expect=1)  # torchrun: the workers exited 143
    launch(2, write_config({**dist, "callbacks": []}, "dist.yaml"))
    got = {r["step"]: r for r in metrics(tmp_path / "runs/tiny") if "train/loss" in r}
    for s in (1, 5, 8, 12, 20):
        assert got[s]["train/loss"] == pytest.approx(ref[s]["train/loss"], rel=1e-4), s
        assert two_lrs(got[s]) == two_lrs(ref[s])


def test_groups_on_lora_adapters(write_config, tmp_path):
    changes = {
        **LM_DATA,
        "trainer.max_steps": 3,
        "trainer.log_every": 1,
        "optimizer": {
            "type": "adamw",
            "lr": 1e-3,
            "groups": [{"match": r"\.lora_B\.", "lr_mult": 4.0}],
        },
    }
    exp = run(write_config(changes))
    names = {id(p): n for n, p in exp.task.named_parameters()}
    groups = {g["name"]: [names[id(p)] for p in g["params"]] for g in exp.optimizer.param_groups}
    assert groups["groups.0"] and all(".lora_B." in n for n in groups["groups.0"])
    assert groups["default"] and all(".lora_A." in n for n in groups["default"])
    for r in lr_rows(tmp_path / "runs/tiny"):
        assert r["train/lr/groups.0"] == pytest.approx(4 * r["train/lr/default"], rel=1e-12)


def test_probe_parameters_never_join_the_main_optimizer(write_config):
    exp = run(
        write_config({"callbacks": [{"type": "online_linear_probe"}], "trainer.max_steps": 3})
    )
    task_params = {id(p) for p in exp.task.parameters()}
    assert all(id(p) in task_params for g in exp.optimizer.param_groups for p in g["params"])


def test_deepspeed_trains_the_groups_as_its_param_groups(write_config, tmp_path):
    grouped = {
        **TWO,
        "optimizers": [],
        "trainer.max_steps": 6,
        "optimizer": {
            "type": "adamw",
            "lr": 3e-3,
            "groups": [{"match": r"^model\.net\.1\.", "lr_mult": 0.1}],
        },
    }
    single = tmp_path / "single"
    single.mkdir()
    from conftest import make_config

    run(make_config(single, grouped))
    ref = {r["step"]: r for r in metrics(single / "runs/tiny") if "train/loss" in r}
    ds = {
        **grouped,
        "strategy": {"type": "deepspeed", "config": {"zero_optimization": {"stage": 2}}},
    }
    launch(2, write_config(ds, "ds.yaml"))
    got = {r["step"]: r for r in metrics(tmp_path / "runs/tiny") if "train/loss" in r}
    for s in range(1, 7):
        assert got[s]["train/lr/groups.0"] == pytest.approx(
            0.1 * got[s]["train/lr/default"], rel=1e-12
        )
        assert got[s]["train/lr/default"] == ref[s]["train/lr/default"]
        assert got[s]["train/loss"] == pytest.approx(ref[s]["train/loss"], rel=1e-3), s
