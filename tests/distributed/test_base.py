"""The strategy base in one process: gradient clipping measured on the gradients themselves."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from src.distributed.single import SingleDeviceStrategy


def _strategy():
    strategy = SingleDeviceStrategy("cpu")
    strategy.setup()
    return strategy


def _total_norm(model: nn.Module) -> float:
    return float(torch.cat([p.grad.flatten() for p in model.parameters()]).norm())


@pytest.mark.parametrize("max_norm", [1.0, 0.01])
def test_clipping_scales_the_gradients_down_to_max_norm(max_norm):
    torch.manual_seed(0)
    layer = nn.Linear(64, 32)
    (layer(torch.randn(16, 64) * 100) ** 2).sum().backward()
    before = _total_norm(layer)
    assert before > 100
    norm = _strategy().clip_grad_norm(layer, max_norm)
    assert float(norm) == pytest.approx(before, rel=1e-5)  # the norm before clipping is reported
    assert _total_norm(layer) == pytest.approx(max_norm, rel=1e-4)


def test_clipping_leaves_small_gradients_and_no_clip_alone():
    layer = nn.Linear(4, 2)
    layer(torch.ones(1, 4)).sum().backward()
    grads = [p.grad.clone() for p in layer.parameters()]
    strategy = _strategy()
    strategy.clip_grad_norm(layer, 1e6)
    strategy.clip_grad_norm(layer, None)
    assert all(torch.equal(g, p.grad) for g, p in zip(grads, layer.parameters()))


def test_fsdp_with_cpu_offload_joins_gloo_beside_nccl():
    """Offloaded gradients are CPU tensors: their norms need a CPU backend beside NCCL."""
    from src.distributed.fsdp import FSDPStrategy

    assert FSDPStrategy(cpu_offload=True).auto_backend(cuda=True) == "cuda:nccl,cpu:gloo"
    assert FSDPStrategy().auto_backend(cuda=True) == "nccl"
    assert FSDPStrategy(cpu_offload=True).auto_backend(cuda=False) == "gloo"
