"""The callback that connects a trial to its study: each evaluation's metric is reported, and the
pruner's decision stops the run (on every rank at the same step)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from src.core.callbacks.base import Callback
from src.core.errors import ConfigError


@dataclass
class Report(Callback):
    """Sends each evaluation's metric to the study and stops the trial when the pruner says so.
    Rank 0 asks the pruner; its answer is broadcast, so every rank stops at the same step.

    Values are reported at the number of training samples seen (steps x global batch x
    accumulation): trials with different batch sizes are compared after the same amount of
    training, and the count goes on from a checkpoint when a trial resumes."""

    metric: str
    trial: Any  # the Optuna trial on rank 0, None elsewhere
    world: int = 1
    samples_per_step: int = 1
    pruned: bool = False
    step: int = 0

    def on_validation_end(self, trainer, metrics: dict[str, float]) -> None:
        self.step = trainer.step
        if self.metric not in metrics:
            raise ConfigError(
                f"metric: {self.metric!r} is not among the evaluation's metrics "
                f"({', '.join(sorted(metrics)) or 'none'})"
            )
        value = float(metrics[self.metric])
        prune = False
        if self.trial is not None:
            if math.isfinite(value):
                self.trial.report(value, trainer.step * self.samples_per_step)
            prune = self.trial.should_prune()
        if self.world > 1:
            import torch.distributed as dist

            box = [prune]
            dist.broadcast_object_list(box, src=0)
            prune = box[0]
        if prune:
            self.pruned = True
            trainer.should_stop = True

    def on_fit_end(self, trainer) -> None:
        self.step = trainer.step
