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

from src.algorithms.base import HFOutput, Inference, Task
from src.core.registry import TASKS


def token_loss_sums(
    logits: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of next-token NLL, number of predicted tokens); labels of -100 are ignored.

    The labels move left by one (the last position predicts nothing) instead of the logits: the
    logits, the largest tensor of a step, are read in place rather than copied."""
    targets = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=-100)
    if logits.dtype != torch.float32:
        logits = logits.float()
    nll = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]),
        targets.reshape(-1),
        ignore_index=-100,
        reduction="sum",
    )
    return nll, (targets != -100).sum()


@TASKS.register("causal_lm")
class CausalLM(Task):
    """Next-token prediction; batches hold ``input_ids``, ``labels`` (-100 where not predicted)
    and optionally ``attention_mask`` (packed examples: a block-diagonal 4D one, with
    ``position_ids`` that restart at each example).
    """

    def __init__(
        self,
        model,
        samples: Annotated[
            int, Field(ge=0, description="continuations generated after each evaluation (0 = none)")
        ] = 2,
        prompt: Annotated[
            Optional[str],
            Field(description="what they continue (default: the start of a validation block)"),
        ] = None,
        max_new_tokens: Annotated[
            int, Field(ge=1, description="length of each sample after an evaluation")
        ] = 48,
        temperature: Annotated[
            float, Field(gt=0, description="sampling temperature of the samples")
        ] = 0.8,
        top_k: Annotated[
            int, Field(ge=0, description="sample among the k most likely tokens (0: all)")
        ] = 50,
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
        kw = {"position_ids": batch["position_ids"]} if "position_ids" in batch else {}
        return self.model(
            input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"), **kw
        )

    def inference(self) -> Inference:
        module = HFOutput(self.model, attention_mask=False)  # blocks of text: no padding
        return Inference(module, module.inputs, "logits")

    @torch.no_grad()
    def predict_step(
        self,
        batch,
        ids=None,
        max_new_tokens: int = 48,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int = 0,
        **options,
    ):
        """Continuations of ``batch["prompt"]`` (strings): greedy at temperature 0, else sampled
        with a generator seeded by ``seed`` and the prompt's id, so that a prompt gets the same
        text however the prompts are split among processes."""
        from src.core.errors import UserError

        if "prompt" not in batch:
            raise UserError(
                "predict: causal_lm continues prompts: give --prompts FILE (one "
                "prompt per line, or JSONL with a 'prompt' field)"
            )
        if self.tokenizer is None:
            raise UserError("predict: the run's data has no tokenizer to encode prompts with")
        tok = self.tokenizer
        device = next(self.model.parameters()).device
        sample = temperature > 0
        gen = dict(
            max_new_tokens=max_new_tokens,
            do_sample=sample,
            pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id,
        )
        if sample:
            gen.update(temperature=temperature, top_p=top_p, top_k=0)
        texts = []
        for i, prompt in enumerate(batch["prompt"]):
            x = tok(prompt, return_tensors="pt")["input_ids"].to(device)
            if sample:
                torch.manual_seed(seed * 1_000_003 + int(ids[i] if ids is not None else i))
            out = self.causal_lm.generate(input_ids=x, attention_mask=torch.ones_like(x), **gen)
            texts.append(tok.decode(out[0, x.shape[1] :], skip_special_tokens=True))
        return {"text": texts}

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

    def validation_epoch_end(self, gather) -> dict[str, Any]:
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
        out = self.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            do_sample=True,
            pad_token_id=tok.pad_token_id,
            **self.gen,
        )
        prompt = tok.decode(ids[0])
        return {
            f"sample_{i}": prompt + " ▸ " + tok.decode(o[ids.shape[1] :], skip_special_tokens=True)
            for i, o in enumerate(out)
        }

    def validation_texts(self) -> dict[str, str]:
        return self.texts
