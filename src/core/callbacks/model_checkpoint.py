"""Keep the best checkpoints by a validation metric (Lightning's ModelCheckpoint)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from src.core.callbacks.base import Callback
from src.core.registry import CALLBACKS


@CALLBACKS.register("model_checkpoint")
class ModelCheckpoint(Callback):
    """Save after every evaluation and keep the ``top_k`` best by ``monitor``.

    It drives the run's CheckpointManager (same directories, commit markers and rotation), on top
    of the ``checkpoint`` section's ``keep_last`` / ``keep_every``.
    """

    def __init__(
        self,
        monitor: Annotated[
            str, Field(description="the metric that ranks checkpoints")
        ] = "val/loss",
        mode: Annotated[
            Literal["min", "max"], Field(description="min or max of the monitored metric is best")
        ] = "min",
        top_k: Annotated[int, Field(ge=1, description="best checkpoints kept")] = 1,
    ):
        self.monitor, self.mode, self.top_k = monitor, mode, top_k

    def on_fit_start(self, trainer) -> None:
        manager = trainer.checkpoints
        if manager is not None:
            manager.monitor, manager.mode, manager.top_k = self.monitor, self.mode, self.top_k
            manager.save_on_eval = True

    def best(self, trainer):
        """Path of the best checkpoint so far, or None."""
        return trainer.checkpoints.best() if trainer.checkpoints else None
