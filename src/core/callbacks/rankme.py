"""RankMe (Garrido et al., 2023): the effective rank of the validation embeddings."""

from __future__ import annotations

import warnings
from typing import Annotated, Optional

import torch
from pydantic import Field, PositiveFloat

from src.core.callbacks.base import Callback
from src.core.registry import CALLBACKS


def rankme(features: torch.Tensor, eps: float = 1e-7) -> float:
    """exp(entropy of the normalised singular values) of an (N, D) matrix: 1 .. min(N, D)."""
    s = torch.linalg.svdvals(features.float())
    p = s / s.sum() + eps
    return float(torch.exp(-(p * p.log()).sum()))


@CALLBACKS.register("rankme")
class RankMe(Callback):
    """Reports ``val/rankme`` after each evaluation and warns when the representation collapses:
    RankMe below ``warn_below`` (default: 2% of the feature width, at least 1.5)."""

    def __init__(
        self,
        warn_below: Annotated[
            Optional[PositiveFloat],
            Field(description="warn when RankMe falls below this (a collapsing representation)"),
        ] = None,
    ):
        self.warn_below = warn_below
        self._feats: list[torch.Tensor] = []

    def on_validation_batch_end(self, trainer, outputs) -> None:
        feats = outputs.get("features")
        if feats is not None and feats.ndim == 2:
            self._feats.append(feats.detach().float())

    def on_validation_end(self, trainer, metrics) -> None:
        if not self._feats:
            return
        feats = trainer.strategy.gather(torch.cat(self._feats))
        self._feats = []
        value = rankme(feats)
        metrics["val/rankme"] = value
        limit = self.warn_below or max(1.5, 0.02 * feats.shape[1])
        if value < limit and trainer.strategy.is_main:
            warnings.warn(
                f"step {trainer.step}: RankMe {value:.2f} < {limit:.2f}: the "
                "representation is collapsing",
                stacklevel=2,
            )
