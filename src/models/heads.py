"""Heads and poolers: margin classifiers for metric learning, projection heads for SSL, GeM."""

from __future__ import annotations

import math
from typing import Literal, Optional

import torch
import torch.nn.functional as F
from torch import nn


class MarginHead(nn.Module):
    """Cosine classifier with an additive margin on the true class (ArcFace, CosFace).

    logits = s * cos(theta_j) for j != y, and s * cos(theta_y + m) (arcface) or
    s * (cos(theta_y) - m) (cosface) for the true class. With ``subcenters = k > 1`` every class
    has k centres and the closest one counts (Sub-center ArcFace, robust to label noise).

    Args:
        embedding_dim: D of the (B, D) embeddings.
        num_classes: C.
        kind: ``arcface`` or ``cosface``.
        scale: s. margin: m. subcenters: k.
    """

    def __init__(
        self,
        embedding_dim: int,
        num_classes: int,
        kind: Literal["arcface", "cosface"] = "arcface",
        scale: float = 30.0,
        margin: float = 0.5,
        subcenters: int = 1,
    ):
        super().__init__()
        self.kind, self.scale, self.margin, self.k = kind, scale, margin, subcenters
        self.weight = nn.Parameter(torch.empty(num_classes * subcenters, embedding_dim))
        nn.init.xavier_uniform_(self.weight)

    def cosine(self, emb: torch.Tensor) -> torch.Tensor:
        """(B, C) cosine to each class (the best sub-centre)."""
        cos = F.linear(F.normalize(emb), F.normalize(self.weight))  # (B, C*k)
        if self.k > 1:
            cos = cos.view(cos.shape[0], -1, self.k).amax(-1)  # (B, C)
        return cos

    def forward(self, emb: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        cos = self.cosine(emb).float()
        target = cos.gather(1, labels[:, None])  # (B, 1)
        if self.kind == "arcface":
            theta = torch.acos(target.clamp(-1 + 1e-7, 1 - 1e-7))
            # past pi - m the margin would make the logit grow again: fall back to a linear penalty
            marked = torch.where(
                theta + self.margin < math.pi,
                torch.cos(theta + self.margin),
                target - self.margin * math.sin(self.margin),
            )
        else:
            marked = target - self.margin
        logits = cos.scatter(1, labels[:, None], marked)
        return logits * self.scale


class GeM(nn.Module):
    """Generalised mean pooling: (B, C, H, W) -> (B, C), ``(mean x^p)^(1/p)`` with learnable p."""

    def __init__(self, p: float = 3.0, eps: float = 1e-6):
        super().__init__()
        self.p = nn.Parameter(torch.tensor(float(p)))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.clamp(min=self.eps).pow(self.p).mean(dim=(-2, -1)).pow(1.0 / self.p)


def mlp(
    in_dim: int, hidden: int, out_dim: int, layers: int = 2, bn_last: bool = False, bn: bool = True
) -> nn.Sequential:
    """Projector/predictor MLP: [Linear, BN, ReLU] x (layers - 1), Linear (+ BN)."""
    mods: list[nn.Module] = []
    width = in_dim
    for _ in range(layers - 1):
        mods += [nn.Linear(width, hidden, bias=not bn)]
        if bn:
            mods.append(nn.BatchNorm1d(hidden))
        mods.append(nn.ReLU(inplace=True))
        width = hidden
    mods.append(nn.Linear(width, out_dim, bias=not bn_last))
    if bn_last:
        mods.append(nn.BatchNorm1d(out_dim, affine=False))
    return nn.Sequential(*mods)


class DINOHead(nn.Module):
    """MLP (with BatchNorm after its hidden layers if ``use_bn``) -> L2-normalised bottleneck ->
    weight-normalised linear layer to K prototypes."""

    def __init__(
        self,
        in_dim: int,
        out_dim: int = 256,
        hidden: int = 256,
        bottleneck: int = 64,
        use_bn: bool = False,
    ):
        super().__init__()

        def block(i: int, o: int) -> list[nn.Module]:
            return [nn.Linear(i, o), *([nn.BatchNorm1d(o)] if use_bn else []), nn.GELU()]

        self.mlp = nn.Sequential(
            *block(in_dim, hidden), *block(hidden, hidden), nn.Linear(hidden, bottleneck)
        )
        last = nn.Linear(bottleneck, out_dim, bias=False)
        self.last = nn.utils.parametrizations.weight_norm(last)
        self.last.parametrizations.weight.original0.data.fill_(1.0)
        self.last.parametrizations.weight.original0.requires_grad = False

    def forward(self, x: torch.Tensor, last_grad: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``last_grad``: a 0-d tensor that scales the prototypes' gradient (0 keeps them fixed, as
        DINO does early on) without a host sync; the gradient is zero, not missing, so DDP stays
        in step."""
        z = F.normalize(self.mlp(x), dim=-1)
        if last_grad is None:
            return self.last(z)
        w = self.last.weight
        return F.linear(z, w.detach() + last_grad * (w - w.detach()))
