"""What a task may ask of the other ranks while it trains, through a handle its strategy gives it.

A task never imports ``torch.distributed``: the composition root sets ``task.collectives`` to
``strategy.collectives()`` before training. In one process (and for a task used on its own) the
handle is :class:`Collectives`, whose operations are the identity.
"""

from __future__ import annotations

from typing import Any

import torch


class Collectives:
    """Cross-rank operations on tensors, called alike on every rank (one process: identity)."""

    world_size = 1
    rank = 0

    def mean(self, t: torch.Tensor) -> torch.Tensor:
        """The mean of ``t`` over every rank. Running statistics that steer training (DINO's
        centre) are global, as in the reference code: each rank's own would drift apart."""
        return t

    def gather(self, t: torch.Tensor) -> torch.Tensor:
        """Every rank's ``t`` (same shape on each) concatenated on dim 0 in rank order (MoCo's
        queue takes every rank's keys, so all ranks hold one queue)."""
        return t

    def gather_with_grad(self, t: torch.Tensor) -> torch.Tensor:
        """Like :meth:`gather`, but gradients flow back to every rank's ``t``: a loss over the
        gathered rows (CLIP's, over the global batch) trains each rank's own rows, as open_clip's
        ``--gather-with-grad``. Its backward sums the other ranks' gradients into this rank's."""
        return t

    def lockstep(self) -> dict[str, Any]:
        """``generate`` arguments that keep several ranks stepping together: sharded weights are
        gathered in every forward, so a rank that finished its sequences early must keep calling
        forward until every rank has (transformers' ``synced_gpus``)."""
        return {"synced_gpus": True} if self.world_size > 1 else {}
