"""Causal language modelling (pretraining and fine-tuning) with transformers models.

Validation reports the loss per token, perplexity, and bits per byte of the held-out text
(``val/bpb``: loss / ln 2 / bytes per token, so tokenizers of any vocabulary compare); after each
evaluation a few sampled continuations are logged as text.
"""
from __future__ import annotations

import math
from typing import Annotated, Any, Optional

import torch
from pydantic import Field

from src.algorithms.base import Task
from src.core.registry import TASKS


def token_loss_sums(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of next-token NLL, number of predicted tokens); labels of -100 are ignored."""
    shift_logits = logits[:, :-1].float()
    shift_labels = labels[:, 1:]
    nll = torch.nn.functional.cross_entropy(shift_logits.reshape(-1, shift_logits.shape[-1]),
                                            shift_labels.reshape(-1), ignore_index=-100,
                                            reduction="sum")
    return nll, (shift_labels != -100).sum()


@TASKS.register("causal_lm")
class CausalLM(Task):
    """Next-token prediction; batches hold ``input_ids``, ``labels`` (-100 where not predicted)
    and optionally ``attention_mask``.
    """

    def __init__(
        self,
        model,
        samples: Annotated[int, Field(
            ge=0,
            description="continuations generated after each evaluation (0 = none)")] = 2,
        prompt: Annotated[Optional[str], Field(
            description="what they continue (default: the start of a validation block)")] = None,
        max_new_tokens: Annotated[int, Field(
            ge=1, description="length of each sample after an evaluation")] = 48,
        temperature: Annotated[float, Field(
            gt=0, description="sampling temperature of the samples")] = 0.8,
        top_k: Annotated[int, Field(
            ge=0, description="sample among the k most likely tokens (0: all)")] = 50,
    ):
        super().__init__(model)
        self.samples, self.prompt = samples, prompt
        self.gen = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k)
        self._sums: Optional[torch.Tensor] = None
        self._first: Optional[torch.Tensor] = None
        self.texts: dict[str, str] = {}

    def configure(self, info) -> None:
        self.tokenizer = info.extra.get("tokenizer")
        self.bytes_per_token = info.extra.get("val_bytes_per_token")

    def forward_lm(self, batch: dict[str, Any]):
        return self.model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"))

    def training_step(self, batch):
        logits = self.forward_lm(batch).logits
        nll, n = token_loss_sums(logits, batch["labels"])
        return {"loss": nll / n.clamp(min=1)}

    def validation_step(self, batch):
        nll, n = token_loss_sums(self.forward_lm(batch).logits, batch["labels"])
        sums = torch.stack([nll.detach(), n.float()]) * (not self.padding_batch)
        self._sums = sums if self._sums is None else self._sums + sums
        if self._first is None:
            self._first = batch["input_ids"][:1]
        return {}

    def validation_epoch_end(self, gather) -> dict[str, torch.Tensor]:
        if self._sums is None:
            return {}
        nll, n = gather(self._sums[None]).sum(0)
        self._sums = None
        loss = float(nll / n)
        out = {"loss": loss, "perplexity": math.exp(min(loss, 50.0))}
        if self.bytes_per_token:
            out["bpb"] = loss / math.log(2) / self.bytes_per_token
        self.texts = self._sample() if self.samples and self.tokenizer is not None else {}
        self._first = None
        return out

    @torch.no_grad()
    def _sample(self) -> dict[str, str]:
        tok = self.tokenizer
        if self.prompt is not None:
            ids = tok(self.prompt, return_tensors="pt")["input_ids"]
        elif self._first is not None:
            ids = self._first[:, :16].cpu()
        else:
            return {}
        device = next(self.model.parameters()).device
        ids = ids.to(device).repeat(self.samples, 1)
        out = self.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                            do_sample=True, pad_token_id=tok.pad_token_id, **self.gen)
        prompt = tok.decode(ids[0])
        return {f"sample_{i}": prompt + " ▸ " + tok.decode(o[ids.shape[1]:], skip_special_tokens=True)
                for i, o in enumerate(out)}

    def validation_texts(self) -> dict[str, str]:
        return self.texts
