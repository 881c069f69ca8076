"""Sequence classification with a transformers model (a pretrained encoder, LoRA or not)."""

from __future__ import annotations

import torch.nn.functional as F

from src.algorithms.base import HFOutput, Inference, Task
from src.core.registry import TASKS


@TASKS.register("sequence_classification")
class SequenceClassification(Task):
    """``model(input_ids, attention_mask).logits`` (B, classes) against ``labels``; reports loss
    and accuracy. Use with ``model: {type: hf, kind: sequence_classification, ...}``."""

    def logits(self, batch):
        return self.model(
            input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask")
        ).logits.float()

    def inference(self) -> Inference:
        module = HFOutput(self.model)
        return Inference(module, module.inputs, "logits")

    def predict_step(self, batch, **options):
        return {"probs": self.logits(batch).softmax(-1)}

    def training_step(self, batch):
        logits = self.logits(batch)
        labels = batch["labels"]
        return {
            "loss": F.cross_entropy(logits, labels),
            "accuracy": (logits.detach().argmax(-1) == labels).float().mean(),
        }

    def validation_step(self, batch):
        logits = self.logits(batch)
        labels = batch["labels"]
        return {
            "loss": F.cross_entropy(logits, labels),
            "accuracy": (logits.argmax(-1) == labels).float().mean(),
        }
