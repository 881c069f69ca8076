"""Masked language modelling (BERT): 15% of tokens are chosen; 80% of those become the mask
token, 10% a random token, 10% stay; the model predicts the originals."""

from __future__ import annotations

from typing import Annotated

import torch
import torch.nn.functional as F
from pydantic import Field

from src.algorithms.base import Task
from src.core.errors import ConfigError
from src.core.registry import TASKS


@TASKS.register("masked_lm")
class MaskedLM(Task):
    """Batches hold ``input_ids`` (and ``attention_mask``); masking happens here, per step."""

    def __init__(
        self,
        model,
        mask_prob: Annotated[
            float,
            Field(
                gt=0, lt=1, description="fraction of (non-special, non-padding) tokens to predict"
            ),
        ] = 0.15,
    ):
        super().__init__(model)
        self.mask_prob = mask_prob

    def configure(self, info) -> None:
        extra = info.extra
        if extra.get("mask_token_id") is None:
            raise ConfigError("task: 'masked_lm' needs a tokenizer with a mask token")
        self.mask_id, self.vocab = extra["mask_token_id"], extra["vocab_size"]
        tok = extra.get("tokenizer")
        self.special = sorted(set(tok.all_special_ids)) if tok is not None else [self.mask_id]

    def mask(self, ids: torch.Tensor, attention_mask=None) -> tuple[torch.Tensor, torch.Tensor]:
        """(masked inputs, labels with -100 where nothing is predicted)."""
        special = torch.isin(ids, torch.tensor(self.special, device=ids.device))
        if attention_mask is not None:
            special |= attention_mask == 0
        chosen = (torch.rand(ids.shape, device=ids.device) < self.mask_prob) & ~special
        labels = torch.where(chosen, ids, torch.full_like(ids, -100))
        action = torch.rand(ids.shape, device=ids.device)
        masked = torch.where(chosen & (action < 0.8), torch.full_like(ids, self.mask_id), ids)
        random_tok = torch.randint(self.vocab, ids.shape, device=ids.device)
        masked = torch.where(chosen & (action >= 0.8) & (action < 0.9), random_tok, masked)
        return masked, labels

    def _step(self, batch):
        inputs, labels = self.mask(batch["input_ids"], batch.get("attention_mask"))
        logits = self.model(input_ids=inputs, attention_mask=batch.get("attention_mask")).logits
        loss = F.cross_entropy(
            logits.float().view(-1, logits.shape[-1]), labels.view(-1), ignore_index=-100
        )
        hit = (logits.argmax(-1) == labels)[labels != -100].float().mean()
        return {"loss": loss, "masked_accuracy": hit.detach()}

    def training_step(self, batch):
        return self._step(batch)

    def validation_step(self, batch):
        out = self._step(batch)
        out["perplexity"] = torch.exp(out["loss"].clamp(max=50.0))
        return out
