"""Metric learning with margin heads (ArcFace, CosFace, Sub-center ArcFace), evaluated by
retrieval: Recall@k and mAP@R on the embeddings of the whole validation split (all ranks)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from src.algorithms.base import Inference, Task
from src.algorithms.retrieval import retrieval_metrics
from src.algorithms.ssl_base import feature_dim
from src.core.registry import TASKS
from src.models.heads import MarginHead


class _Embedder(nn.Module):
    """Backbone, embedding layer, L2 normalisation: the embeddings retrieval compares."""

    def __init__(self, model: nn.Module, embed: nn.Module):
        super().__init__()
        self.model, self.embed = model, embed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.embed(self.model(x)).float(), dim=1)


@TASKS.register("metric_learning")
class MetricLearning(Task):
    """backbone features -> Linear + BatchNorm embedding -> margin head over the classes."""

    def __init__(
        self,
        model,
        head: Annotated[
            Literal["arcface", "cosface", "subcenter_arcface"],
            Field(description="arcface, cosface or subcenter_arcface"),
        ] = "arcface",
        embedding_dim: Annotated[
            int, Field(gt=0, description="D of the embedding used for retrieval")
        ] = 64,
        scale: Annotated[
            float,
            Field(gt=0, description="the head's s and m; subcenters: k for subcenter_arcface"),
        ] = 30.0,
        margin: Annotated[
            float,
            Field(ge=0, description="the head's s and m; subcenters: k for subcenter_arcface"),
        ] = 0.5,
        subcenters: Annotated[
            int, Field(ge=2, description="sub-centres per class (subcenter_arcface)")
        ] = 3,
        recall_at: Annotated[
            list[Annotated[int, Field(ge=1)]],
            Field(description="k values of the Recall@k evaluation"),
        ] = [1, 5],
    ):
        super().__init__(model)
        self.head_kind, self.embedding_dim = head, embedding_dim
        self.scale, self.margin, self.subcenters = scale, margin, subcenters
        self.recall_at = list(recall_at)
        self._val: list[tuple[torch.Tensor, torch.Tensor]] = []

    def configure(self, info) -> None:
        feat = feature_dim(self.model, info, "metric_learning")
        self.embed = nn.Sequential(
            nn.Linear(feat, self.embedding_dim), nn.BatchNorm1d(self.embedding_dim)
        )
        kind: Literal["arcface", "cosface"] = (
            "cosface" if self.head_kind == "cosface" else "arcface"
        )
        k = self.subcenters if self.head_kind == "subcenter_arcface" else 1
        self.head = MarginHead(
            self.embedding_dim, info.num_classes, kind, self.scale, self.margin, k
        )

    def embeddings(self, x: torch.Tensor) -> torch.Tensor:
        return self.embed(self.model(x))

    def inference(self) -> Inference:
        return Inference(_Embedder(self.model, self.embed), ("inputs",), "embedding")

    def training_step(self, batch: dict[str, Any]):
        emb = self.embeddings(batch["inputs"])
        labels = batch["labels"]
        loss = F.cross_entropy(self.head(emb, labels), labels)
        accuracy = (self.head.cosine(emb.detach()).argmax(-1) == labels).float().mean()
        return {"loss": loss, "accuracy": accuracy, "features": emb.detach(), "labels": labels}

    def validation_step(self, batch: dict[str, Any]):
        emb = F.normalize(self.embeddings(batch["inputs"]).float(), dim=1)
        self._val.append(self.valid(emb, batch["labels"]))
        return {"features": emb, "labels": batch["labels"]}

    def validation_epoch_end(self, gather) -> dict[str, Any]:
        if not self._val:
            return {}
        emb = gather(torch.cat([e for e, _ in self._val]))
        labels = gather(torch.cat([y for _, y in self._val]))
        self._val = []
        return retrieval_metrics(emb, labels, self.recall_at)
