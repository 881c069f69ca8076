"""BYOL (Grill et al., 2020): an online network predicts a slowly moving target network."""

from __future__ import annotations

from typing import Annotated, Any, Optional

import torch
from pydantic import Field
from torch import nn

from src.algorithms.ssl_base import SSLTask, cosine_momentum, ema_update, frozen_copy
from src.core.registry import TASKS
from src.models.heads import mlp
from src.models.losses import byol_loss


@TASKS.register("byol")
class BYOL(SSLTask):
    """Symmetric loss 2 - 2 cos(predictor(online(v1)), target(v2)); the target follows the online
    network with a momentum rising from ``base_momentum`` to 1 along a cosine.
    """

    def __init__(
        self,
        model,
        proj_dim: Annotated[
            int, Field(gt=0, description="output width of the projector and predictor")
        ] = 128,
        hidden: Annotated[
            int, Field(gt=0, description="hidden width of the projector and predictor MLPs")
        ] = 512,
        base_momentum: Annotated[
            float,
            Field(ge=0, lt=1, description="target momentum at the start; it follows a cosine to 1"),
        ] = 0.99,
        views: Annotated[
            Optional[dict[str, Any]],
            Field(description="a TRANSFORMS section for the two views (default: views)"),
        ] = None,
    ):
        super().__init__(model, views)
        self.proj_dim, self.hidden, self.base_momentum = proj_dim, hidden, base_momentum

    def configure(self, info) -> None:
        super().configure(info)
        self.projector = mlp(self.feat_dim, self.hidden, self.proj_dim)
        self.predictor = mlp(self.proj_dim, self.hidden, self.proj_dim)
        self.target = frozen_copy(nn.Sequential(self.model, self.projector))

    def training_step(self, batch):
        v1, v2 = self.batch_views(batch, 2)[:2]
        n = v1.shape[0]
        h = self.model(torch.cat([v1, v2]))
        p1, p2 = self.predictor(self.projector(h)).chunk(2)
        with torch.no_grad():
            t1, t2 = self.target(torch.cat([v1, v2])).chunk(2)
        loss = byol_loss(p1, t2) + byol_loss(p2, t1)
        return {"loss": loss, "features": h[:n].detach(), "labels": batch["labels"]}

    def on_step_end(self, step: int, max_steps: int) -> None:
        m = cosine_momentum(self.base_momentum, step, max_steps)
        ema_update(self.target, nn.Sequential(self.model, self.projector), m)
