"""MoCo v2 (Chen et al., 2020): a momentum key encoder and a queue of negative keys."""
from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F
from pydantic import confloat, conint
from torch import nn

from src.algorithms.ssl_base import SSLTask, ema_update, frozen_copy
from src.core.registry import TASKS
from src.models.heads import mlp
from src.models.losses import info_nce


@TASKS.register("moco")
class MoCo(SSLTask):
    """Query encoder (backbone + projector) trained with InfoNCE against a momentum key encoder
    and a queue of ``queue_size`` past keys; the queue and key encoder are checkpointed.

    Args: proj_dim, hidden, queue_size, temperature, momentum (of the key encoder), views.
    """

    def __init__(self, model, proj_dim: conint(gt=0) = 128, hidden: conint(gt=0) = 512,
                 queue_size: conint(gt=0) = 1024, temperature: confloat(gt=0) = 0.2,
                 momentum: confloat(ge=0, lt=1) = 0.99, views: Optional[dict[str, Any]] = None):
        super().__init__(model, views)
        self.proj_dim, self.hidden, self.queue_size = proj_dim, hidden, queue_size
        self.temperature, self.momentum = temperature, momentum

    def configure(self, info) -> None:
        super().configure(info)
        self.projector = mlp(self.feat_dim, self.hidden, self.proj_dim)
        self.key_encoder = frozen_copy(nn.Sequential(self.model, self.projector))
        self.register_buffer("queue", F.normalize(torch.randn(self.queue_size, self.proj_dim), dim=1))
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
