"""A rich progress bar with ETA and the latest loss."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Optional

from pydantic import Field

from src.core.callbacks.base import Callback
from src.core.registry import CALLBACKS

if TYPE_CHECKING:
    from rich.progress import Progress


@CALLBACKS.register("progress")
@CALLBACKS.register("progress_bar")
class RichProgressBar(Callback):
    """Steps done / total, steps per second and ETA; the latest logged loss in the description."""

    def __init__(
        self,
        transient: Annotated[bool, Field(description="remove the bar when training ends")] = False,
    ):
        self.transient = transient
        self.progress: Optional[Progress] = None

    def on_fit_start(self, trainer) -> None:
        if not trainer.strategy.is_main:
            return
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self.progress = progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("eta"),
            TimeRemainingColumn(),
            transient=self.transient,
        )
        self.task_id = progress.add_task("train", total=trainer.max_steps, completed=trainer.step)
        progress.start()

    def on_step_end(self, trainer, outputs) -> None:
        if self.progress is not None:
            self.progress.update(self.task_id, completed=trainer.step)

    def on_log(self, trainer, metrics) -> None:
        if self.progress is not None and "train/loss" in metrics:
            parts = [f"loss {metrics['train/loss']:.4f}"]
            if "train/lr" in metrics:
                parts.append(f"lr {metrics['train/lr']:.2e}")
            rate = metrics.get("train/samples_per_sec")
            if rate:
                parts.append(f"{rate:,.0f} samples/s")
            self.progress.update(self.task_id, description=" | ".join(parts))

    def on_fit_end(self, trainer) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None
