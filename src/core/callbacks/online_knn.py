"""Weighted k-NN accuracy of validation features against a queue of recent training features."""

from __future__ import annotations

from typing import Annotated, Optional

import torch
import torch.nn.functional as F
from pydantic import Field

from src.core.callbacks.base import Callback, ValAccuracy
from src.core.registry import CALLBACKS


@CALLBACKS.register("online_knn")
class OnlineKNN(Callback):
    """Keeps the last ``queue_size`` training ``features`` (L2-normalised) with their labels; each
    validation feature votes among its ``k`` nearest, weighted by exp(similarity / temperature)
    (Wu et al., 2018). Reports ``val/knn_accuracy``."""

    def __init__(
        self,
        k: Annotated[int, Field(ge=1, description="neighbours that vote")] = 20,
        temperature: Annotated[
            float, Field(gt=0, description="vote weight exp(similarity / temperature)")
        ] = 0.07,
        queue_size: Annotated[
            int, Field(ge=1, description="training features kept as the memory")
        ] = 4096,
    ):
        self.k, self.t, self.size = k, temperature, queue_size
        self.bank: Optional[torch.Tensor] = None
        self.bank_labels: Optional[torch.Tensor] = None
        self.ptr, self.filled = 0, 0
        self._val = ValAccuracy()

    def on_step_end(self, trainer, outputs) -> None:
        feats, labels = outputs.get("features"), outputs.get("labels")
        if feats is None or labels is None or feats.ndim != 2:
            return
        feats = F.normalize(feats.detach().float(), dim=1)
        if self.bank is None or self.bank_labels is None:
            self.bank = feats.new_zeros(self.size, feats.shape[1])
            self.bank_labels = labels.new_zeros(self.size)
        bank, bank_labels = self.bank, self.bank_labels
        n = min(len(feats), self.size)
        idx = (self.ptr + torch.arange(n, device=feats.device)) % self.size
        bank[idx], bank_labels[idx] = feats[:n], labels[:n]
        self.ptr = (self.ptr + n) % self.size
        self.filled = min(self.size, self.filled + n)

    def on_validation_batch_end(self, trainer, outputs) -> None:
        feats, labels = outputs.get("features"), outputs.get("labels")
        if (
            self.bank is None
            or self.bank_labels is None
            or feats is None
            or labels is None
            or self.filled == 0
        ):
            return
        bank, bank_labels = self.bank[: self.filled], self.bank_labels[: self.filled]
        sim = F.normalize(feats.float(), dim=1) @ bank.T  # (B, M); B may be 0 (padding batch)
        top, idx = sim.topk(min(self.k, self.filled), dim=1)
        weights = (top / self.t).exp()
        classes = int(torch.cat([bank_labels, labels]).max()) + 1
        votes = torch.zeros(len(feats), classes, device=feats.device)
        votes.scatter_add_(1, bank_labels[idx], weights)
        self._val.add(votes.argmax(1), labels)

    def on_validation_end(self, trainer, metrics) -> None:
        accuracy = self._val.result(trainer.strategy)
        if accuracy is not None:
            metrics["val/knn_accuracy"] = accuracy

    def state_dict(self) -> dict:
        if self.bank is None or self.bank_labels is None:
            return {}
        return {
            "bank": self.bank.cpu(),
            "labels": self.bank_labels.cpu(),
            "ptr": self.ptr,
            "filled": self.filled,
        }

    def load_state_dict(self, state: dict) -> None:
        if state:
            self.bank, self.bank_labels = state["bank"], state["labels"]
            self.ptr, self.filled = state["ptr"], state["filled"]

    def on_fit_start(self, trainer) -> None:
        if self.bank is not None and self.bank_labels is not None:
            self.bank = self.bank.to(trainer.strategy.device)
            self.bank_labels = self.bank_labels.to(trainer.strategy.device)
