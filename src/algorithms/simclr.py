"""SimCLR (Chen et al., 2020): two views, a projector, NT-Xent over the 2N views."""

from __future__ import annotations

from typing import Annotated, Any, Optional

import torch
from pydantic import Field

from src.algorithms.ssl_base import SSLTask
from src.core.registry import TASKS
from src.models.heads import mlp
from src.models.losses import nt_xent


@TASKS.register("simclr")
class SimCLR(SSLTask):
    """SimCLR: two augmented views of each image pulled together, all others pushed apart (NT-Xent)."""

    def __init__(
        self,
        model,
        proj_dim: Annotated[
            int,
            Field(gt=0, description="output width of the projector (the loss is computed there)"),
        ] = 128,
        hidden: Annotated[
            int, Field(gt=0, description="hidden width of the 2-layer projector")
        ] = 512,
        temperature: Annotated[
            float, Field(gt=0, description="softmax temperature of NT-Xent; lower is sharper")
        ] = 0.2,
        views: Annotated[
            Optional[dict[str, Any]],
            Field(description="TRANSFORMS section that makes the two augmented views"),
        ] = None,
    ):
        super().__init__(model, views)
        self.proj_dim, self.hidden, self.temperature = proj_dim, hidden, temperature

    def configure(self, info) -> None:
        super().configure(info)
        self.projector = mlp(self.feat_dim, self.hidden, self.proj_dim)

    def training_step(self, batch):
        v1, v2 = self.batch_views(batch, 2)[:2]
        n = v1.shape[0]
        h = self.model(torch.cat([v1, v2]))  # (2N, D): one pass, batch statistics over both views
        z1, z2 = self.projector(h).chunk(2)
        return {
            "loss": nt_xent(z1, z2, self.temperature),
            "features": h[:n].detach(),
            "labels": batch["labels"],
        }
