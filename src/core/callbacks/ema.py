"""Exponential moving average of the weights, optionally used for evaluation; checkpointed."""

from __future__ import annotations

from typing import Annotated

import torch
from pydantic import Field

from src.core.callbacks.base import Callback
from src.core.registry import CALLBACKS


def _whole(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _like(whole: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """``whole`` on ``ref``'s device, sharded as ``ref`` is when it is a DTensor (FSDP2)."""
    if hasattr(ref, "device_mesh"):
        from torch.distributed.tensor import DTensor, distribute_tensor

        if isinstance(ref, DTensor):
            return distribute_tensor(whole.to(ref.device), ref.device_mesh, ref.placements)
    return whole.to(ref.device)


@CALLBACKS.register("ema")
class EMA(Callback):
    """``shadow = decay * shadow + (1 - decay) * weights`` after every optimizer step.

    With ``warmup``, the decay ramps as ``min(decay, (1 + n) / (10 + n))`` so early averages are
    not dominated by the random initialisation. Floating-point buffers (BatchNorm statistics) are
    averaged too.
    """

    def __init__(
        self,
        decay: Annotated[
            float, Field(gt=0, lt=1, description="the average's decay per step")
        ] = 0.999,
        use_for_eval: Annotated[
            bool,
            Field(
                description="evaluate with the averaged weights (the training weights are restored "
                "after)"
            ),
        ] = True,
        warmup: Annotated[
            bool,
            Field(
                description="a smaller decay early on (min(decay, (1 + n) / (10 + n))), so the average "
                "follows the first steps"
            ),
        ] = True,
    ):
        self.decay, self.use_for_eval, self.warmup = decay, use_for_eval, warmup
        self.updates = 0
        self.shadow: list[torch.Tensor] = []
        self._backup: list[torch.Tensor] = []

    def _tensors(self, trainer) -> list[torch.Tensor]:
        module = trainer.task
        return [t for t in (*module.parameters(), *module.buffers()) if t.is_floating_point()]

    shapes_evaluation = True  # evaluate() of the Python API prepares it before evaluating

    def on_fit_start(self, trainer) -> None:
        tensors = self._tensors(trainer)
        if not self.shadow:
            self.shadow = [t.detach().clone() for t in tensors]
        else:  # restored whole from a checkpoint: laid out like the weights (sharded or not)
            self.shadow = [_like(s, t) for s, t in zip(self.shadow, tensors)]

    @torch.no_grad()
    def on_step_end(self, trainer, outputs) -> None:
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates)) if self.warmup else self.decay
        torch._foreach_lerp_(self.shadow, [t.detach() for t in self._tensors(trainer)], 1 - d)

    @torch.no_grad()
    def _swap(self, trainer) -> None:
        for t, s in zip(self._tensors(trainer), self.shadow):
            tmp = t.detach().clone()
            t.copy_(s)
            s.copy_(tmp)

    def on_validation_start(self, trainer) -> None:
        if self.use_for_eval and self.shadow:
            self._swap(trainer)

    def on_validation_end(self, trainer, metrics) -> None:
        if self.use_for_eval and self.shadow:
            self._swap(trainer)

    def state_dict(self) -> dict:
        """Whole tensors: under FSDP each rank holds a shard, and only rank 0 writes this state
        (gathering is collective: every rank saves). A run resumes at any world size."""
        return {"updates": self.updates, "shadow": [_whole(s).cpu() for s in self.shadow]}

    def load_state_dict(self, state: dict) -> None:
        self.updates, self.shadow = state["updates"], list(state["shadow"])
