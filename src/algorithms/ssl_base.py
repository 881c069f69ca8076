"""What self-supervised tasks share: views from the data, backbone features, momentum teachers."""

from __future__ import annotations

import copy
import math
from typing import Any, Optional

import torch
from torch import nn

from src.algorithms.base import Inference, Task
from src.core.dataset_info import DatasetInfo
from src.core.errors import ConfigError


def feature_dim(model: nn.Module, info: DatasetInfo, task: str) -> int:
    """Width of the backbone's (B, D) output; a model that does not return features is an error."""
    was_training = model.training
    model.eval()
    with torch.no_grad():
        out = model(torch.zeros(2, *info.input_shape))
    model.train(was_training)
    if out.ndim != 2:
        raise ConfigError(
            f"task: '{task}' needs a backbone that returns (batch, features); "
            f"the model returned shape {tuple(out.shape)}"
        )
    if (
        info.num_classes
        and out.shape[1] == info.num_classes
        and getattr(model, "num_features", out.shape[1]) != out.shape[1]
    ):
        raise ConfigError(
            f"task: '{task}' needs features, not class logits: set model.num_classes: 0"
        )
    return int(out.shape[1])


def frozen_copy(module: nn.Module) -> nn.Module:
    """A teacher: a deep copy whose parameters never receive gradients or join the optimizer."""
    teacher = copy.deepcopy(module)
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """teacher = momentum * teacher + (1 - momentum) * student, parameters only, one fused op."""
    t: list[torch.Tensor] = [p for p in teacher.parameters()]
    s = [p.detach() for p in student.parameters()]
    torch._foreach_lerp_(t, s, 1.0 - momentum)


def cosine_momentum(base: float, step: int, max_steps: int) -> float:
    """BYOL/DINO schedule: base at step 0, rising to 1 along a half cosine at the last step."""
    return 1 - (1 - base) * (math.cos(math.pi * min(step, max_steps) / max(max_steps, 1)) + 1) / 2


class SSLTask(Task):
    """Base of self-supervised tasks. Each training batch carries ``views``, made by the task's
    ``views`` section (a TRANSFORMS entry): for the whole batch on its device by default
    (``batch_views``), or per sample in the loader (``views``, ``multi_crop``); validation returns
    backbone features of the clean inputs with their labels, for the online probes, k-NN and
    RankMe callbacks."""

    default_views: Optional[dict[str, Any]] = {"type": "batch_views", "n_views": 2}

    def __init__(self, model: nn.Module, views: Optional[dict[str, Any]] = None):
        super().__init__(model)
        self.views = views if views is not None else self.default_views

    def train_views(self) -> Optional[dict[str, Any]]:
        """The TRANSFORMS section that makes the training views (None: no views)."""
        return self.views

    def configure(self, info: DatasetInfo) -> None:
        self.feat_dim = feature_dim(self.model, info, type(self).__name__.lower())

    def batch_views(self, batch: dict[str, Any], n: int) -> list[torch.Tensor]:
        views = batch.get("views")
        if views is None or len(views) < n:
            raise ConfigError(
                f"task: {type(self).__name__} needs {n} views per sample; its "
                "'views' section must produce them"
            )
        return views

    def inference(self) -> Inference:
        return Inference(self.model, ("inputs",), "features")

    def validation_step(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        return {"features": self.model(batch["inputs"]).float(), "labels": batch["labels"]}
