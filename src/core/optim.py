"""Optimizers and learning-rate schedules, registered by name.

Every ``torch.optim`` optimizer is registered by its lower-case class name (``adamw``, ``sgd``,
...), plus ``lars``. Schedulers are per-step: ``constant``, ``warmup_cosine``, ``warmup_linear``,
``step`` and ``onecycle``; warm-up is given in steps (``warmup_steps``) or as a fraction of the
run (``warmup_ratio``).
"""

from __future__ import annotations

import math
from typing import Annotated, Literal, Optional

import torch
from pydantic import Field, NonNegativeFloat, PositiveFloat

from src.core.errors import ConfigError
from src.core.registry import OPTIMIZERS, SCHEDULERS

# Literal so that `--list` can read them without importing torch (see src/run/catalog.py).
TORCH_OPTIMIZERS = (
    "adadelta",
    "adafactor",
    "adagrad",
    "adam",
    "adamax",
    "adamw",
    "asgd",
    "lbfgs",
    "muon",
    "nadam",
    "radam",
    "rmsprop",
    "rprop",
    "sgd",
    "sparseadam",
)


def torch_optimizer_classes() -> dict[str, type]:
    """Lower-case name -> optimizer class, for every optimizer this torch ships."""
    return {
        name.lower(): cls
        for name, cls in vars(torch.optim).items()
        if isinstance(cls, type)
        and issubclass(cls, torch.optim.Optimizer)
        and cls is not torch.optim.Optimizer
    }


# What torch checks when it builds an optimizer, checked at load time instead (with the config's
# path in the message), for the hyper-parameters whose default says what they are.
_SCALAR_RANGES = {
    "lr": PositiveFloat,
    "eps": NonNegativeFloat,
    "weight_decay": NonNegativeFloat,
    "momentum": NonNegativeFloat,
    "lr_decay": NonNegativeFloat,
    "initial_accumulator_value": NonNegativeFloat,
    "rho": Annotated[float, Field(ge=0, le=1)],
    "alpha": NonNegativeFloat,
    "dampening": Annotated[float, Field(ge=0, le=1)],
}
_BETA = Annotated[float, Field(ge=0, lt=1)]


def hyper_parameter_types(cls: type) -> dict[str, object]:
    """Validation types for an optimizer class's usual hyper-parameters (finite, in range)."""
    import inspect

    out: dict[str, object] = {}
    for name, p in inspect.signature(cls).parameters.items():
        if (
            name in _SCALAR_RANGES
            and isinstance(p.default, (int, float))
            and not isinstance(p.default, bool)
        ):
            out[name] = _SCALAR_RANGES[name]
        elif name == "betas" and isinstance(p.default, tuple) and len(p.default) == 2:
            out[name] = tuple[_BETA, _BETA]
    return out


for _name, _cls in torch_optimizer_classes().items():
    if _name in TORCH_OPTIMIZERS:
        OPTIMIZERS.register(_name, field_types=hyper_parameter_types(_cls))(_cls)


@OPTIMIZERS.register("lars")
class LARS(torch.optim.Optimizer):
    """SGD with momentum and layer-wise adaptive rate scaling (You et al., 2017), as used for SSL.

    Each parameter's update is scaled by ``trust_coefficient * ||w|| / (||g|| + wd * ||w||)``.
    Parameters with ``ndim <= 1`` (biases, norms) skip weight decay and the scaling.
    """

    def __init__(
        self,
        params,
        lr: Annotated[float, Field(gt=0, description="learning rate")] = 0.1,
        momentum: Annotated[float, Field(ge=0, lt=1, description="SGD momentum")] = 0.9,
        weight_decay: Annotated[
            float,
            Field(
                ge=0,
                description="L2 penalty on weights with ndim > 1 (biases and norms skip it and the "
                "scaling)",
            ),
        ] = 1e-6,
        trust_coefficient: Annotated[
            float, Field(gt=0, description="scales the layer-wise rate ||w|| / ||g||")
        ] = 0.001,
        eps: Annotated[
            float, Field(gt=0, description="added to the denominator of the trust ratio")
        ] = 1e-8,
    ):
        defaults = dict(
            lr=lr,
            momentum=momentum,
            weight_decay=weight_decay,
            trust_coefficient=trust_coefficient,
            eps=eps,
        )
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                if p.ndim > 1:
                    g = g.add(p, alpha=group["weight_decay"])
                    w_norm, g_norm = torch.linalg.vector_norm(p), torch.linalg.vector_norm(g)
                    trust = torch.where(
                        (w_norm > 0) & (g_norm > 0),
                        group["trust_coefficient"] * w_norm / (g_norm + group["eps"]),
                        torch.ones_like(w_norm),
                    )
                    g = g.mul(trust)
                buf = self.state[p].get("momentum_buffer")
                if buf is None:
                    buf = self.state[p]["momentum_buffer"] = g.clone()
                else:
                    buf.mul_(group["momentum"]).add_(g)
                p.add_(buf, alpha=-group["lr"])
        return loss


def _warmup(total_steps: int, warmup_steps: int, warmup_ratio: float) -> int:
    if warmup_steps and warmup_ratio:
        raise ConfigError("scheduler: give warmup_steps or warmup_ratio, not both")
    return warmup_steps or int(round(warmup_ratio * total_steps))


def _lambda(optimizer, fn):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, fn)


# Parameters the schedulers share.
WarmupSteps = Annotated[int, Field(ge=0, description="steps of linear warm-up from 0")]
WarmupRatio = Annotated[
    float, Field(ge=0, lt=1, description="warm-up as a fraction of the total steps")
]
MinLrRatio = Annotated[
    float, Field(ge=0, le=1, description="the final lr as a fraction of the optimizer's lr")
]


@SCHEDULERS.register("constant")
def constant(
    optimizer,
    total_steps: int,
    warmup_steps: WarmupSteps = 0,
    warmup_ratio: WarmupRatio = 0.0,
):
    """The optimizer's lr, after an optional linear warm-up from 0 (no scheduler without one)."""
    w = _warmup(total_steps, warmup_steps, warmup_ratio)
    return _lambda(optimizer, lambda s: min(1.0, (s + 1) / w)) if w else None


def _warmup_then(optimizer, total_steps: int, warmup: int, decay):
    """Linear warm-up over ``warmup`` steps, then ``decay(progress in [0, 1])`` as the factor."""

    def fn(s: int) -> float:
        if s < warmup:
            return (s + 1) / warmup
        return decay(min(1.0, (s - warmup) / max(1, total_steps - warmup)))

    return _lambda(optimizer, fn)


@SCHEDULERS.register("warmup_cosine")
def warmup_cosine(
    optimizer,
    total_steps: int,
    warmup_steps: WarmupSteps = 0,
    warmup_ratio: WarmupRatio = 0.0,
    min_lr_ratio: MinLrRatio = 0.0,
):
    """Linear warm-up, then cosine decay to ``min_lr_ratio * lr`` at ``total_steps``."""
    return _warmup_then(
        optimizer,
        total_steps,
        _warmup(total_steps, warmup_steps, warmup_ratio),
        lambda p: min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * p)),
    )


@SCHEDULERS.register("warmup_linear")
def warmup_linear(
    optimizer,
    total_steps: int,
    warmup_steps: WarmupSteps = 0,
    warmup_ratio: WarmupRatio = 0.0,
    min_lr_ratio: MinLrRatio = 0.0,
):
    """Linear warm-up, then linear decay to ``min_lr_ratio * lr`` at ``total_steps``."""
    return _warmup_then(
        optimizer,
        total_steps,
        _warmup(total_steps, warmup_steps, warmup_ratio),
        lambda p: 1 - (1 - min_lr_ratio) * p,
    )


@SCHEDULERS.register("step")
def step(
    optimizer,
    total_steps: int,
    step_size: Annotated[int, Field(gt=0, description="optimizer steps between two decays")],
    gamma: Annotated[float, Field(gt=0, description="factor of each decay")] = 0.1,
    warmup_steps: WarmupSteps = 0,
    warmup_ratio: WarmupRatio = 0.0,
):
    """Multiply the lr by ``gamma`` every ``step_size`` optimizer steps (after warm-up)."""
    w = _warmup(total_steps, warmup_steps, warmup_ratio)
    return _lambda(optimizer, lambda s: (s + 1) / w if s < w else gamma ** ((s - w) // step_size))


@SCHEDULERS.register("onecycle")
def onecycle(
    optimizer,
    total_steps: int,
    pct_start: Annotated[
        float, Field(gt=0, lt=1, description="fraction of the steps spent increasing the lr")
    ] = 0.3,
    div_factor: Annotated[
        float, Field(gt=0, description="the start lr is the peak / div_factor")
    ] = 25.0,
    final_div_factor: Annotated[
        float, Field(gt=0, description="the final lr is the start lr / final_div_factor")
    ] = 1e4,
    anneal_strategy: Annotated[
        Literal["cos", "linear"], Field(description="cos or linear")
    ] = "cos",
    max_lr: Annotated[
        Optional[float], Field(description="the peak lr (default: the optimizer's lr)")
    ] = None,
):
    """torch's OneCycleLR; the peak is the optimizer's lr unless ``max_lr`` is given."""
    peak = max_lr if max_lr is not None else [g["lr"] for g in optimizer.param_groups]
    return torch.optim.lr_scheduler.OneCycleLR(
        optimizer,
        max_lr=peak,
        total_steps=max(total_steps, 2),
        pct_start=pct_start,
        div_factor=div_factor,
        final_div_factor=final_div_factor,
        anneal_strategy=anneal_strategy,
        cycle_momentum=False,
    )
