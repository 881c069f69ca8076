"""VICReg (Bardes et al., 2022): invariance, variance and covariance terms; no negatives, no teacher."""
from __future__ import annotations

from typing import Any, Optional

import torch
from pydantic import confloat, conint

from src.algorithms.ssl_base import SSLTask
from src.core.registry import TASKS
from src.models.heads import mlp
from src.models.losses import vicreg_loss


@TASKS.register("vicreg")
class VICReg(SSLTask):
    """VICReg: invariance between views plus variance and covariance terms that prevent collapse.

    Args:
        proj_dim: output width of the expander.
        hidden: hidden width of the 3-layer expander.
        sim_weight: weight of the invariance (mean squared distance) term.
        var_weight: weight of the variance (hinge on each dimension's std) term.
        cov_weight: weight of the covariance (off-diagonal) term.
        views: TRANSFORMS section that makes the two augmented views.
    """

    def __init__(self, model, proj_dim: conint(gt=0) = 256, hidden: conint(gt=0) = 256,
                 sim_weight: confloat(ge=0) = 25.0, var_weight: confloat(ge=0) = 25.0,
                 cov_weight: confloat(ge=0) = 1.0, views: Optional[dict[str, Any]] = None):
        super().__init__(model, views)
        self.proj_dim, self.hidden = proj_dim, hidden
        self.weights = (sim_weight, var_weight, cov_weight)

    def configure(self, info) -> None:
        super().configure(info)
        self.expander = mlp(self.feat_dim, self.hidden, self.proj_dim, layers=3)

    def training_step(self, batch):
        v1, v2 = self.batch_views(batch, 2)[:2]
        n = v1.shape[0]
        h = self.model(torch.cat([v1, v2]))
        z1, z2 = self.expander(h).float().chunk(2)
        out = vicreg_loss(z1, z2, *self.weights)
        return {**out, "features": h[:n].detach(), "labels": batch["labels"]}
