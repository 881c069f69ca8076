"""The Callback base: a few hooks into the loop, each a no-op until overridden.

Hooks receive the trainer, whose public attributes (``step``, ``epoch``, ``task``, ``optimizer``,
``strategy``, ``should_stop``, ``run_dir``) are theirs to read; ``should_stop = True`` ends the
run after the current step. ``state_dict`` is saved with every checkpoint.
"""

from __future__ import annotations

from typing import Any, Optional

import torch


class Callback:
    def on_fit_start(self, trainer) -> None:
        """Before the first step (after any resume)."""

    def on_before_optimizer_step(self, trainer, grad_norm) -> None:
        """Gradients are ready (unscaled, clipped); ``grad_norm`` is their total norm (a tensor)."""

    def on_step_end(self, trainer, outputs: dict[str, Any]) -> None:
        """After each optimizer step: the step's scalars (averaged over micro-batches) and
        ``grad_norm``, plus the last micro-batch's other outputs (features, labels ...)."""

    def on_log(self, trainer, metrics: dict[str, float]) -> None:
        """Before metrics are sent to the loggers; may add entries to ``metrics``."""

    def on_validation_start(self, trainer) -> None:
        """Before evaluation (EMA swaps its weights in here)."""

    def on_validation_batch_end(self, trainer, outputs: dict[str, Any]) -> None:
        """After each validation batch, with everything the task returned (features, labels)."""

    def on_validation_end(self, trainer, metrics: dict[str, float]) -> None:
        """After evaluation with its ``val/...`` metrics."""

    def on_epoch_end(self, trainer) -> None:
        """After the last step of an epoch."""

    def on_fit_end(self, trainer) -> None:
        """After training, also when it stops on an error."""

    def state_dict(self) -> dict[str, Any]:
        """What a resume needs of this callback (tensors and plain values); checkpointed."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what ``state_dict`` returned, before the first step of a resumed run."""


class ValAccuracy:
    """Correct predictions over one validation pass, summed over ranks at its end (device
    tensors until then: no host sync per batch). Padding batches add zero rows."""

    def __init__(self):
        self._sums: Optional[tuple[torch.Tensor, torch.Tensor]] = None

    def add(self, predicted: torch.Tensor, labels: torch.Tensor) -> None:
        hits = (predicted == labels).sum().float()
        n = torch.tensor(float(len(labels)), device=hits.device)
        self._sums = (hits, n) if self._sums is None else (self._sums[0] + hits, self._sums[1] + n)

    def result(self, strategy) -> Optional[float]:
        """The accuracy over every rank's samples (None if nothing was added); starts anew."""
        if self._sums is None:
            return None
        total = strategy.reduce({"hits": self._sums[0], "n": self._sums[1]})
        self._sums = None
        return float(total["hits"] / total["n"])
