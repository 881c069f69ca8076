"""Sequence-to-sequence (T5, BART) training: the decoder learns the target given the source."""

from __future__ import annotations

import torch

from src.algorithms.base import Task
from src.core.registry import TASKS


@TASKS.register("seq2seq")
class Seq2Seq(Task):
    """Batches hold ``input_ids``/``attention_mask`` of the source and ``labels`` of the target
    (-100 on padding); the model shifts the labels into decoder inputs. Reports loss and perplexity."""

    def _loss(self, batch) -> torch.Tensor:
        return self.model(
            input_ids=batch["input_ids"],
            attention_mask=batch.get("attention_mask"),
            labels=batch["labels"],
        ).loss

    def training_step(self, batch):
        return {"loss": self._loss(batch)}

    def validation_step(self, batch):
        loss = self._loss(batch).float()
        return {"loss": loss, "perplexity": torch.exp(loss.clamp(max=50.0))}
