"""VICReg (Bardes et al., 2022): invariance, variance and covariance terms; no negatives, no teacher."""

from __future__ import annotations

from typing import Annotated, Any, Optional

import torch
from pydantic import Field

from src.algorithms.ssl_base import SSLTask
from src.core.registry import TASKS
from src.models.heads import mlp
from src.models.losses import vicreg_loss


@TASKS.register("vicreg")
class VICReg(SSLTask):
    """VICReg: invariance between views plus variance and covariance terms that prevent collapse."""

    def __init__(
        self,
        model,
        proj_dim: Annotated[int, Field(gt=0, description="output width of the expander")] = 256,
        hidden: Annotated[
            int, Field(gt=0, description="hidden width of the 3-layer expander")
        ] = 256,
        sim_weight: Annotated[
            float, Field(ge=0, description="weight of the invariance (mean squared distance) term")
        ] = 25.0,
        var_weight: Annotated[
            float,
            Field(ge=0, description="weight of the variance (hinge on each dimension's std) term"),
        ] = 25.0,
        cov_weight: Annotated[
            float, Field(ge=0, description="weight of the covariance (off-diagonal) term")
        ] = 1.0,
        views: Annotated[
            Optional[dict[str, Any]],
            Field(description="TRANSFORMS section that makes the two augmented views"),
        ] = None,
    ):
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
