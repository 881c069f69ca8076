"""Watch gradient norms: the largest per interval, per-layer norms, and a warning on explosions."""

from __future__ import annotations

import warnings
from typing import Annotated

import torch
from pydantic import Field

from src.core.callbacks.base import Callback
from src.core.registry import CALLBACKS


@CALLBACKS.register("gradient_monitor")
class GradientMonitor(Callback):
    """Adds ``train/grad_norm_max`` to every log and warns when it jumps.

    The maximum is kept on the device (no sync per step); the check runs at log time.
    """

    def __init__(
        self,
        explosion_factor: Annotated[
            float,
            Field(
                gt=1,
                description="warn when an interval's largest norm exceeds this many times the running "
                "average of earlier intervals",
            ),
        ] = 10.0,
        per_layer: Annotated[
            bool, Field(description="also log grad_norm/<parameter> on log steps")
        ] = False,
    ):
        self.factor, self.per_layer = explosion_factor, per_layer
        self.max_norm: torch.Tensor | None = None
        self.average: float | None = None
        self.layer_norms: dict[str, float] = {}

    def on_before_optimizer_step(self, trainer, grad_norm: torch.Tensor) -> None:
        self.max_norm = (
            grad_norm.detach()
            if self.max_norm is None
            else torch.maximum(self.max_norm, grad_norm.detach())
        )
        if self.per_layer and (trainer.step + 1) % trainer.cfg.log_every == 0:
            self.layer_norms = {
                n: p.grad.detach().norm().item()
                for n, p in trainer.task.named_parameters()
                if p.grad is not None
            }

    def on_log(self, trainer, metrics: dict[str, float]) -> None:
        if self.max_norm is None or "train/grad_norm" not in metrics:
            return
        peak = float(self.max_norm)
        self.max_norm = None
        metrics["train/grad_norm_max"] = peak
        for name, v in self.layer_norms.items():
            metrics[f"grad_norm/{name}"] = v
        if self.average is not None and peak > self.factor * self.average:
            warnings.warn(
                f"step {trainer.step}: gradient norm {peak:.3g} is "
                f"{peak / self.average:.1f}x its running average",
                stacklevel=2,
            )
        mean = metrics["train/grad_norm"]
        self.average = mean if self.average is None else 0.9 * self.average + 0.1 * mean

    def state_dict(self) -> dict:
        return {"average": self.average}

    def load_state_dict(self, state: dict) -> None:
        self.average = state["average"]
