"""Log the learning rate (and momentum) of every parameter group."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field

from src.core.callbacks.base import Callback
from src.core.registry import CALLBACKS


@CALLBACKS.register("lr_monitor")
class LRMonitor(Callback):
    """Adds ``train/lr_group<i>`` (and ``train/momentum_group<i>``) to every log."""

    def __init__(
        self,
        log_momentum: Annotated[
            bool, Field(description="also log each group's momentum (or beta1)")
        ] = False,
    ):
        self.log_momentum = log_momentum

    def on_log(self, trainer, metrics: dict[str, float]) -> None:
        if not any(k.startswith("train/") for k in metrics):
            return
        for i, group in enumerate(trainer.optimizer.param_groups):
            metrics[f"train/lr_group{i}"] = float(group["lr"])
            if self.log_momentum:
                m = group.get("betas", (group.get("momentum"),))[0]
                if m is not None:
                    metrics[f"train/momentum_group{i}"] = float(m)
