"""MoCo v2 (Chen et al., 2020): a momentum key encoder and a queue of negative keys."""

from __future__ import annotations

from typing import Annotated, Any, Optional

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from src.algorithms.ssl_base import SSLTask, ema_update, frozen_copy
from src.core.registry import TASKS
from src.models.heads import mlp
from src.models.losses import info_nce


@TASKS.register("moco")
class MoCo(SSLTask):
    """Query encoder (backbone + projector) trained with InfoNCE against a momentum key encoder
    and a queue of ``queue_size`` past keys; the queue and key encoder are checkpointed.
    """

    queue: torch.Tensor  # (queue_size, proj_dim) buffers, registered in configure
    queue_ptr: torch.Tensor

    def __init__(
        self,
        model,
        proj_dim: Annotated[int, Field(gt=0, description="output width of the projector")] = 128,
        hidden: Annotated[int, Field(gt=0, description="hidden width of the projector MLP")] = 512,
        queue_size: Annotated[
            int, Field(gt=0, description="negative keys kept from earlier batches (all ranks')")
        ] = 1024,
        temperature: Annotated[float, Field(gt=0, description="InfoNCE temperature")] = 0.2,
        momentum: Annotated[
            float, Field(ge=0, lt=1, description="momentum of the key encoder")
        ] = 0.99,
        views: Annotated[
            Optional[dict[str, Any]],
            Field(description="a TRANSFORMS section for the two views (default: views)"),
        ] = None,
    ):
        super().__init__(model, views)
        self.proj_dim, self.hidden, self.queue_size = proj_dim, hidden, queue_size
        self.temperature, self.momentum = temperature, momentum

    def configure(self, info) -> None:
        super().configure(info)
        self.projector = mlp(self.feat_dim, self.hidden, self.proj_dim)
        self.key_encoder = frozen_copy(nn.Sequential(self.model, self.projector))
        self.register_buffer(
            "queue", F.normalize(torch.randn(self.queue_size, self.proj_dim), dim=1)
        )
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))

    def training_step(self, batch):
        v1, v2 = self.batch_views(batch, 2)[:2]
        h = self.model(v1)
        q = self.projector(h)
        with torch.no_grad():
            k = F.normalize(self.key_encoder(v2), dim=1)
        loss = info_nce(q, k, self.queue.clone(), self.temperature)
        self._enqueue(self.collectives.gather(k))  # one queue: every rank's keys, on every rank
        return {"loss": loss, "features": h.detach(), "labels": batch["labels"]}

    @torch.no_grad()
    def _enqueue(self, keys: torch.Tensor) -> None:
        n, size = keys.shape[0], self.queue_size
        idx = (self.queue_ptr + torch.arange(n, device=keys.device)) % size  # no host sync
        self.queue[idx] = keys.to(self.queue.dtype)
        self.queue_ptr.copy_((self.queue_ptr + n) % size)

    def on_step_end(self, step: int, max_steps: int) -> None:
        ema_update(self.key_encoder, nn.Sequential(self.model, self.projector), self.momentum)
