"""DPO: preference pairs train the policy directly against a frozen reference (Rafailov et al.)."""

from __future__ import annotations

import contextlib
from typing import Annotated, Literal

import torch
from pydantic import Field

from src.algorithms.base import Task
from src.algorithms.ssl_base import frozen_copy
from src.core.registry import TASKS
from src.models.losses import dpo_loss


def sequence_logps(
    model, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor
) -> torch.Tensor:
    """Sum over answer tokens (labels != -100) of log p(token | prefix): (B,)."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1].float()
    target = labels[:, 1:]
    mask = target != -100
    logp = torch.log_softmax(logits, dim=-1).gather(-1, target.clamp(min=0)[..., None])[..., 0]
    return (logp * mask).sum(-1)


@TASKS.register("dpo")
class DPO(Task):
    """Batches hold ``chosen_*`` and ``rejected_*`` ids, masks and labels (prompt masked).

    Reports the loss, the preference accuracy (the policy prefers the chosen answer more than the
    reference does), the reward margin, and ``chosen_preferred``: how often the policy itself
    gives the chosen answer the higher log-probability.
    """

    def __init__(
        self,
        model,
        beta: Annotated[
            float, Field(gt=0, description="strength of the implicit KL constraint")
        ] = 0.1,
        reference: Annotated[
            Literal["auto", "frozen_copy", "disable_adapter"],
            Field(
                description="frozen_copy of the initial model, or disable_adapter (a PEFT model's base,"
                " the adapter switched off; no copy). auto: the latter when there is an "
                "adapter"
            ),
        ] = "auto",
    ):
        super().__init__(model)
        self.beta = beta
        has_adapter = hasattr(model, "disable_adapter")
        self.use_adapter_off = reference == "disable_adapter" or (
            reference == "auto" and has_adapter
        )
        if not self.use_adapter_off:
            self.reference = frozen_copy(model).eval()

    def _reference(self):
        if self.use_adapter_off:
            return self.model, self.causal_lm.disable_adapter()
        return self.reference, contextlib.nullcontext()

    def _pair(self, model, batch, prefix: str) -> torch.Tensor:
        return sequence_logps(
            model,
            batch[f"{prefix}_input_ids"],
            batch[f"{prefix}_attention_mask"],
            batch[f"{prefix}_labels"],
        )

    def _step(self, batch):
        pc, pr = self._pair(self.model, batch, "chosen"), self._pair(self.model, batch, "rejected")
        ref, ctx = self._reference()
        with torch.no_grad(), ctx:
            rc, rr = self._pair(ref, batch, "chosen"), self._pair(ref, batch, "rejected")
        loss, logits = dpo_loss(pc, pr, rc, rr, self.beta)
        return {
            "loss": loss,
            "preference_accuracy": (logits.detach() > 0).float().mean(),
            "reward_margin": logits.detach().mean() / self.beta,
            "chosen_preferred": (pc.detach() > pr.detach()).float().mean(),
        }

    def training_step(self, batch):
        return self._step(batch)

    def validation_step(self, batch):
        return self._step(batch)
