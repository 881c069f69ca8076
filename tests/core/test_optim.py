import math

import pytest
import torch

from src.core.errors import ConfigError
from src.core.optim import LARS
from src.core.registry import OPTIMIZERS, SCHEDULERS
from src.run.catalog import load_builtins

load_builtins()


def lrs(name, total=100, **kw):
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = SCHEDULERS.build({"type": name, **kw}, optimizer=opt, total_steps=total)
    out = []
    for _ in range(total):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        if sched is not None:
            sched.step()
    return out


def test_warmup_in_steps_or_ratio():
    a, b = lrs("warmup_cosine", warmup_steps=10), lrs("warmup_cosine", warmup_ratio=0.1)
    assert a == b
    assert a[0] == pytest.approx(0.1) and a[9] == pytest.approx(1.0)
    assert a[-1] == pytest.approx(0.5 * (1 + math.cos(math.pi * 89 / 90)), abs=1e-6)


def test_schedule_shapes():
    assert lrs("constant") == [1.0] * 100  # no scheduler object at all
    assert lrs("constant", warmup_steps=4)[:5] == [0.25, 0.5, 0.75, 1.0, 1.0]
    lin = lrs("warmup_linear", warmup_steps=0, min_lr_ratio=0.1)
    assert lin[0] == 1.0 and lin[50] == pytest.approx(1 - 0.9 * 0.5)
    st = lrs("step", step_size=30, gamma=0.5)
    assert st[29] == 1.0 and st[30] == 0.5 and st[90] == 0.125
    oc = lrs("onecycle", pct_start=0.3)
    assert max(oc) == pytest.approx(1.0, rel=1e-3) and oc[0] < 0.1 and oc[-1] < 1e-3


def test_warmup_steps_and_ratio_together_is_an_error():
    with pytest.raises(ConfigError, match="not both"):
        lrs("constant", warmup_steps=5, warmup_ratio=0.1)


def test_lars_scales_updates_per_layer():
    w = torch.nn.Parameter(torch.ones(4, 4))
    b = torch.nn.Parameter(torch.ones(4))
    opt = LARS([w, b], lr=1.0, momentum=0.0, weight_decay=0.0, trust_coefficient=0.01)
    w.grad, b.grad = torch.full((4, 4), 100.0), torch.full((4,), 0.5)
    opt.step()
    # trust ratio = 0.01 * ||w|| / ||g|| = 0.01 * 4 / 400 -> update = 1e-4 * 100 = 0.01
    torch.testing.assert_close(w.detach(), torch.full((4, 4), 0.99))
    torch.testing.assert_close(b.detach(), torch.full((4,), 0.5))  # 1-d: plain SGD


def test_optimizers_build_over_parameter_groups():
    model = torch.nn.Linear(3, 3)
    groups = [{"params": [model.weight]}, {"params": [model.bias], "weight_decay": 0.0}]
    opt = OPTIMIZERS.build({"type": "adamw", "lr": 0.01, "weight_decay": 0.1}, params=groups)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]
    for name in ("sgd", "adam", "rmsprop", "lars", "radam"):
        OPTIMIZERS.build({"type": name, "lr": 0.01}, params=model.parameters())
