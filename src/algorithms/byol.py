"""BYOL (Grill et al., 2020): an online network predicts a slowly moving target network."""
from __future__ import annotations

from typing import Any, Optional

import torch
from pydantic import confloat, conint
from torch import nn

from src.algorithms.ssl_base import SSLTask, cosine_momentum, ema_update, frozen_copy
from src.core.registry import TASKS
from src.models.heads import mlp
from src.models.losses import byol_loss


@TASKS.register("byol")
class BYOL(SSLTask):
    """Symmetric loss 2 - 2 cos(predictor(online(v1)), target(v2)); the target follows the online
    network with a momentum rising from ``base_momentum`` to 1 along a cosine.

    Args: proj_dim, hidden, base_momentum, views.
    """

    def __init__(self, model, proj_dim: conint(gt=0) = 128, hidden: conint(gt=0) = 512,
                 base_momentum: confloat(ge=0, lt=1) = 0.99, views: Optional[dict[str, Any]] = None):
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
