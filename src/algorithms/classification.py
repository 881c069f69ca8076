"""Supervised classification: cross-entropy with optional label smoothing, accuracy and top-k."""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from pydantic import confloat, conint

from src.algorithms.base import Task
from src.core.registry import TASKS
from src.data.info import DatasetInfo


@TASKS.register("classification")
class Classification(Task):
    """``model(inputs) -> logits (B, num_classes)``; batches hold ``inputs`` and ``labels``.

    Args:
        label_smoothing: cross-entropy label smoothing in [0, 1).
        top_k: extra top-k accuracies reported in validation (k >= 2, below num_classes).
        train_accuracy: also report accuracy on training batches (a few cheap ops per step).
    """

    def __init__(self, model, label_smoothing: confloat(ge=0, lt=1) = 0.0,
                 top_k: list[conint(ge=2)] = [5], train_accuracy: bool = True):
        super().__init__(model)
        self.label_smoothing = label_smoothing
        self.top_k = list(top_k)
        self.train_accuracy = train_accuracy

    def configure(self, info: DatasetInfo) -> None:
        self.top_k = [k for k in self.top_k if info.num_classes and k < info.num_classes]

    def training_step(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        logits = self.model(batch["inputs"])
        labels = batch["labels"]
        loss = F.cross_entropy(logits, labels, label_smoothing=self.label_smoothing)
        if not self.train_accuracy:
            return {"loss": loss}
        return {"loss": loss, "accuracy": (logits.detach().argmax(-1) == labels).float().mean()}

    def validation_step(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        logits = self.model(batch["inputs"]).float()
        labels = batch["labels"]
        out = {"loss": F.cross_entropy(logits, labels),
               "accuracy": (logits.argmax(-1) == labels).float().mean()}
        if self.top_k:
            ranked = logits.topk(max(self.top_k), dim=-1).indices  # (B, kmax)
            hits = ranked == labels[:, None]
            for k in self.top_k:
                out[f"top{k}_accuracy"] = hits[:, :k].any(-1).float().mean()
        return out
