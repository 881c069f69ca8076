"""Supervised training of any model with any loss: ``loss(model(inputs), labels)``.

What ``Experiment.from_modules(model, loss_fn=...)`` trains: the loss is a function given to the
Python API (by reference) or the name of a ``torch.nn.functional`` loss (``cross_entropy``,
``mse_loss``, ``l1_loss``, ...). Validation reports the loss, and the accuracy where the outputs
are class scores ``(B, C)`` and the labels class indices ``(B,)``.
"""

from __future__ import annotations

from typing import Annotated, Any

import torch
import torch.nn.functional as F
from pydantic import Field

from src.algorithms.base import Inference, Task
from src.core import objects
from src.core.errors import ConfigError
from src.core.registry import TASKS


def _loss_fn(name: str):
    if name.startswith("torch.nn.functional."):
        name = name.rsplit(".", 1)[-1]
    fn = getattr(F, name, None)
    losses = ("cross_entropy", "nll_loss", "binary_cross_entropy")
    if fn is not None and (name.endswith("_loss") or name in losses):
        return fn
    if "." in name:
        fn = objects.get(name, "task.loss")
        if isinstance(fn, torch.nn.Module) or callable(fn):
            return fn
    raise ConfigError(
        f"task.loss: {name!r} is neither a torch.nn.functional loss "
        "(cross_entropy, mse_loss, ...) nor a function given to the Python API"
    )


@TASKS.register("supervised")
class Supervised(Task):
    """``loss(model(inputs), labels)`` for any model and loss; batches hold ``inputs`` and
    ``labels``."""

    def __init__(
        self,
        model,
        loss: Annotated[
            str,
            Field(
                description=(
                    "a torch.nn.functional loss name, or the reference of a loss function given to "
                    "the Python API"
                )
            ),
        ] = "cross_entropy",
    ):
        super().__init__(model)
        self.loss_name = loss
        self.loss_fn = _loss_fn(loss)
        if isinstance(self.loss_fn, torch.nn.Module):
            self.criterion = self.loss_fn  # its parameters (if any) train and checkpoint too

    def inference(self) -> Inference:
        return Inference(self.model, ("inputs",), "outputs")

    def predict_step(self, batch: dict[str, Any], **options) -> dict[str, Any]:
        return {"outputs": self.model(batch["inputs"])}

    def _step(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        out = self.model(batch["inputs"])
        labels = batch["labels"]
        metrics = {"loss": self.loss_fn(out, labels)}
        if (
            isinstance(out, torch.Tensor)
            and out.ndim == 2
            and out.is_floating_point()
            and labels.ndim == 1
            and not labels.is_floating_point()
        ):
            metrics["accuracy"] = (out.detach().argmax(-1) == labels).float().mean()
        return metrics

    def training_step(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        return self._step(batch)

    def validation_step(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        return {k: v.detach() for k, v in self._step(batch).items()}
