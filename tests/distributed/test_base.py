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


def test_a_strategy_missing_a_contract_method_cannot_be_built():
    from src.distributed.base import Strategy

    class Incomplete(Strategy):
        def setup(self):
            pass

    with pytest.raises(TypeError, match="abstract"):
        Incomplete()


def test_a_strategy_written_from_the_base_docstring_alone_trains_and_resumes(write_config):
    """The contract is enough: the five abstract members, nothing else, run a whole experiment
    with a checkpoint and an exact resume, and the strategy sees only its LoopSettings."""
    from helpers import metrics, run

    from src.core.registry import STRATEGIES
    from src.distributed.base import LoopSettings, Strategy

    seen = []

    @STRATEGIES.register("test_minimal")
    class Minimal(Strategy):
        def setup(self):
            self.device = torch.device("cpu")

        def configure(self, settings):
            seen.append(settings)
            super().configure(settings)

        def wrap(self, task, make_optimizer=None):
            return task, make_optimizer(task)

        def reduce(self, values, op="sum"):
            return values

        def gather(self, tensor):
            return tensor

        def barrier(self):
            pass

    changes = {"strategy": {"type": "test_minimal"}, "trainer.grad_clip": 0.5}
    one = run(write_config({**changes, "name": "one"}))
    run(write_config({**changes, "name": "two", "trainer.max_steps": 10}))
    two = run(write_config({**changes, "name": "two"}))  # extends the run to 20 steps
    assert seen[0] == LoopSettings(batch_size=32, grad_clip=0.5, optimizer="adamw")
    assert two.trainer.step == 20
    assert metrics(one.run_dir)[-1] == metrics(two.run_dir)[-1]


@pytest.mark.parametrize(
    "message",
    [
        "[../gloo/transport/tcp/pair.cc:534] Connection closed by peer [127.0.0.1]:41234",
        "[../gloo/transport/tcp/unbound_buffer.cc:81] Timed out waiting 5000ms for recv operation",
        "Application timeout caused pair closure",
    ],
)
def test_what_gloo_says_when_a_peer_is_gone_is_one_line_naming_the_timeout(message):
    from src.distributed.ddp import DDPStrategy

    strategy = DDPStrategy(timeout_s=5)
    strategy.rank = 0
    line = strategy.describe_failure(RuntimeError(message))
    assert line is not None and line.startswith("rank 0: a collective failed (")
    assert "strategy.timeout_s = 5" in line and "\n" not in line
    assert strategy.describe_failure(RuntimeError("shape mismatch")) is None
