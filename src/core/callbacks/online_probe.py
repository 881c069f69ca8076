"""A linear classifier trained online on detached features: how linearly separable the
representation is, while it is being learned."""

from __future__ import annotations

from typing import Annotated, Optional

import torch
import torch.nn.functional as F
from pydantic import Field

from src.core.callbacks.base import Callback, ValAccuracy
from src.core.registry import CALLBACKS


@CALLBACKS.register("online_linear_probe")
class OnlineLinearProbe(Callback):
    """Trains ``Linear(features, classes)`` with its own AdamW on every step's detached
    ``features``/``labels`` outputs; its parameters are never in the main optimizer. Reports
    ``train/probe_accuracy`` and, after each evaluation, ``val/probe_accuracy``.
    """

    def __init__(
        self,
        lr: Annotated[
            float, Field(gt=0, description="learning rate of the probe's own AdamW")
        ] = 1e-2,
        weight_decay: Annotated[
            float, Field(ge=0, description="weight decay of the probe's AdamW")
        ] = 0.0,
    ):
        self.lr, self.weight_decay = lr, weight_decay
        self.probe: Optional[torch.nn.Linear] = None
        self.opt: Optional[torch.optim.Optimizer] = None
        self._pending: Optional[dict] = None
        self._val = ValAccuracy()
        self._train_hits = None

    def _build(
        self, dim: int, classes: int, device
    ) -> tuple[torch.nn.Linear, torch.optim.Optimizer]:
        self.probe = torch.nn.Linear(dim, classes).to(device)
        self.opt = torch.optim.AdamW(
            self.probe.parameters(), lr=self.lr, weight_decay=self.weight_decay
        )
        if self._pending:  # restored from a checkpoint before the sizes were known
            self.probe.load_state_dict(self._pending["probe"])
            self.opt.load_state_dict(self._pending["opt"])
            self._pending = None
        return self.probe, self.opt

    def on_fit_start(self, trainer) -> None:
        self.classes = trainer.run_info.get("params", {}).get("data.num_classes") or getattr(
            trainer.task, "num_classes", None
        )

    def on_step_end(self, trainer, outputs) -> None:
        feats, labels = outputs.get("features"), outputs.get("labels")
        if feats is None or labels is None or feats.ndim != 2:
            return
        if self.probe is None or self.opt is None:
            probe, opt = self._build(
                feats.shape[1], self.classes or int(labels.max()) + 1, feats.device
            )
        else:
            probe, opt = self.probe, self.opt
        with torch.enable_grad():
            logits = probe(feats.detach().float())
            loss = F.cross_entropy(logits, labels)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        hits = (logits.detach().argmax(-1) == labels).float().mean()
        self._train_hits = hits if self._train_hits is None else 0.9 * self._train_hits + 0.1 * hits

    def on_log(self, trainer, metrics) -> None:
        if self._train_hits is not None and "train/loss" in metrics:
            metrics["train/probe_accuracy"] = float(self._train_hits)

    def on_validation_batch_end(self, trainer, outputs) -> None:
        feats, labels = outputs.get("features"), outputs.get("labels")
        if self.probe is None or feats is None or labels is None:
            return
        self._val.add(self.probe(feats.float()).argmax(-1), labels)

    def on_validation_end(self, trainer, metrics) -> None:
        accuracy = self._val.result(trainer.strategy)
        if accuracy is not None:
            metrics["val/probe_accuracy"] = accuracy

    def state_dict(self) -> dict:
        if self.probe is None or self.opt is None:
            return {}
        return {"probe": self.probe.state_dict(), "opt": self.opt.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if state:
            self._pending = state
