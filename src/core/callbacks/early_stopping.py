"""Stop when a validation metric stops improving, or diverges."""

from __future__ import annotations

import math
import warnings
from typing import Annotated, Literal, Optional

from pydantic import Field

from src.core.callbacks.base import Callback
from src.core.registry import CALLBACKS


@CALLBACKS.register("early_stopping")
class EarlyStopping(Callback):
    """Sets ``trainer.should_stop`` after ``patience`` evaluations without improvement."""

    def __init__(
        self,
        monitor: Annotated[
            str, Field(description="a logged validation metric, e.g. val/loss")
        ] = "val/loss",
        mode: Annotated[
            Literal["min", "max"], Field(description="min if lower is better, max if higher is")
        ] = "min",
        patience: Annotated[
            int, Field(ge=1, description="evaluations without an improvement of at least min_delta")
        ] = 3,
        min_delta: Annotated[
            float, Field(ge=0, description="smallest change that counts as an improvement")
        ] = 0.0,
        divergence_threshold: Annotated[
            Optional[float], Field(description="stop at once when the metric is worse than this")
        ] = None,
        check_finite: Annotated[
            bool, Field(description="stop at once when the metric is NaN or infinite")
        ] = True,
    ):
        self.monitor, self.mode, self.patience, self.min_delta = monitor, mode, patience, min_delta
        self.divergence_threshold, self.check_finite = divergence_threshold, check_finite
        self.best: Optional[float] = None
        self.wait = 0
        self.reason = ""

    def _better(self, value: float, than: float) -> bool:
        return (
            value < than - self.min_delta if self.mode == "min" else value > than + self.min_delta
        )

    def on_validation_end(self, trainer, metrics: dict[str, float]) -> None:
        if self.monitor not in metrics:
            warnings.warn(
                f"early_stopping: metric '{self.monitor}' not among {sorted(metrics)}", stacklevel=2
            )
            return
        value = metrics[self.monitor]
        if self.check_finite and not math.isfinite(value):
            self.reason = f"{self.monitor} is {value}"
        elif (
            self.divergence_threshold is not None
            and not self._better(value, self.divergence_threshold)
            and value != self.divergence_threshold
        ):
            self.reason = f"{self.monitor} = {value:.4g} is past divergence_threshold"
        elif self.best is None or self._better(value, self.best):
            self.best, self.wait = value, 0
            return
        else:
            self.wait += 1
            if self.wait < self.patience:
                return
            self.reason = (
                f"{self.monitor} did not improve for {self.wait} evaluations (best {self.best:.4g})"
            )
        trainer.should_stop = True
        if trainer.strategy.is_main:
            print(f"early stopping at step {trainer.step}: {self.reason}", flush=True)

    def state_dict(self) -> dict:
        return {"best": self.best, "wait": self.wait}

    def load_state_dict(self, state: dict) -> None:
        self.best, self.wait = state["best"], state["wait"]
