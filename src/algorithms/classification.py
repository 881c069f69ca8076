"""Supervised classification: cross-entropy (label smoothing, mixup/cutmix), accuracy, top-k, and
a confusion matrix written as a PNG at the end of a run."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Optional

import torch
import torch.nn.functional as F
from pydantic import Field

from src.algorithms.base import Inference, Task
from src.core.dataset_info import DatasetInfo
from src.core.errors import ConfigError
from src.core.registry import TASKS

if TYPE_CHECKING:
    from timm.data import Mixup


@TASKS.register("classification")
class Classification(Task):
    """``model(inputs) -> logits (B, num_classes)``; batches hold ``inputs`` and ``labels``."""

    def __init__(
        self,
        model,
        label_smoothing: Annotated[
            float, Field(ge=0, lt=1, description="cross-entropy label smoothing in [0, 1)")
        ] = 0.0,
        top_k: Annotated[
            list[Annotated[int, Field(ge=2)]],
            Field(
                description="extra top-k accuracies reported in validation (k >= 2, below num_classes)"
            ),
        ] = [5],
        train_accuracy: Annotated[
            bool,
            Field(
                description="also report accuracy on training batches (a few cheap ops per step)"
            ),
        ] = True,
        mixup_alpha: Annotated[
            float,
            Field(ge=0, description="timm's Mixup/CutMix (0 = off); mix_prob: chance per batch"),
        ] = 0.0,
        cutmix_alpha: Annotated[
            float,
            Field(ge=0, description="timm's Mixup/CutMix (0 = off); mix_prob: chance per batch"),
        ] = 0.0,
        mix_prob: Annotated[
            float,
            Field(
                ge=0,
                le=1,
                description="probability that a batch is mixed when mixup or cutmix is on",
            ),
        ] = 1.0,
        confusion_matrix: Annotated[
            bool, Field(description="write confusion_matrix.png of the last evaluation")
        ] = True,
    ):
        super().__init__(model)
        self.label_smoothing = label_smoothing
        self.top_k = list(top_k)
        self.train_accuracy = train_accuracy
        self.mix = (mixup_alpha, cutmix_alpha, mix_prob)
        self.mixup: Optional[Mixup] = None
        self.want_confusion = confusion_matrix
        self.confusion: torch.Tensor | None = None
        self._preds: list[tuple[torch.Tensor, torch.Tensor]] = []

    def configure(self, info: DatasetInfo) -> None:
        if not info.num_classes:
            raise ConfigError("task: classification needs labelled data; this data has no classes")
        self.num_classes = info.num_classes
        self.class_names = list(info.class_names) or [str(i) for i in range(info.num_classes)]
        self.top_k = [k for k in self.top_k if k < info.num_classes]
        mixup_alpha, cutmix_alpha, prob = self.mix
        if mixup_alpha or cutmix_alpha:
            from timm.data import Mixup

            self.mixup = Mixup(
                mixup_alpha=mixup_alpha,
                cutmix_alpha=cutmix_alpha,
                prob=prob,
                label_smoothing=self.label_smoothing,
                num_classes=info.num_classes,
            )

    def inference(self) -> Inference:
        return Inference(self.model, ("inputs",), "logits")

    def predict_step(self, batch: dict[str, Any], **options) -> dict[str, Any]:
        return {"probs": self.model(batch["inputs"]).float().softmax(-1)}

    def training_step(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        x, labels = batch["inputs"], batch["labels"]
        if self.mixup is not None and x.shape[0] % 2 == 0:
            x, soft = self.mixup(x, labels)  # soft (B, C) targets, smoothing included
            logits = self.model(x)
            loss = torch.sum(-soft * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()
        else:
            logits = self.model(x)
            loss = F.cross_entropy(logits, labels, label_smoothing=self.label_smoothing)
        if not self.train_accuracy:
            return {"loss": loss}
        return {"loss": loss, "accuracy": (logits.detach().argmax(-1) == labels).float().mean()}

    def validation_step(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        logits = self.model(batch["inputs"]).float()
        labels = batch["labels"]
        pred = logits.argmax(-1)
        out = {"loss": F.cross_entropy(logits, labels), "accuracy": (pred == labels).float().mean()}
        if self.top_k:
            ranked = logits.topk(max(self.top_k), dim=-1).indices  # (B, kmax)
            hits = ranked == labels[:, None]
            for k in self.top_k:
                out[f"top{k}_accuracy"] = hits[:, :k].any(-1).float().mean()
        if self.want_confusion:
            self._preds.append(self.valid(pred, labels))
        return out

    def validation_epoch_end(self, gather) -> dict[str, Any]:
        if self._preds:
            pred = gather(torch.cat([p for p, _ in self._preds]))
            true = gather(torch.cat([t for _, t in self._preds]))
            self._preds = []
            c = self.num_classes
            self.confusion = torch.bincount(true * c + pred, minlength=c * c).view(c, c).cpu()
        return {}

    def write_artifacts(self, run_dir: Path) -> None:
        if self.confusion is None:
            return
        from src.core.figures import heatmap

        cm = self.confusion.numpy()
        heatmap(
            cm.tolist(),
            self.class_names[: len(cm)],
            f"confusion matrix (accuracy {cm.trace() / max(cm.sum(), 1):.4f})",
            run_dir / "confusion_matrix.png",
        )
