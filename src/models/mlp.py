"""A multi-layer perceptron that flattens its input."""
from __future__ import annotations

import math
from typing import Literal, Optional

import torch
from pydantic import confloat, conint
from torch import nn

from src.core.dataset_info import DatasetInfo
from src.core.registry import MODELS

ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "tanh": nn.Tanh}


class MLP(nn.Module):
    """(B, *input_shape) -> flatten -> [Linear, act, dropout] x len(hidden) -> Linear -> (B, out).

    ``num_classes=0`` drops the last Linear: the model returns features of size ``hidden[-1]``.
    """

    def __init__(self, in_features: int, hidden: list[int], num_classes: int,
                 activation: str = "relu", dropout: float = 0.0):
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        width = in_features
        for h in hidden:
            layers += [nn.Linear(width, h), ACTIVATIONS[activation]()]
            if dropout:
                layers.append(nn.Dropout(dropout))
            width = h
        self.num_features = width
        if num_classes:
            layers.append(nn.Linear(width, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


@MODELS.register("mlp")
def mlp(info: DatasetInfo, hidden: list[conint(gt=0)] = [256, 256],
        activation: Literal["relu", "gelu", "silu", "tanh"] = "relu",
        dropout: confloat(ge=0, lt=1) = 0.0, num_classes: Optional[conint(ge=0)] = None) -> MLP:
    """MLP sized from the data: inputs = prod(info.input_shape), outputs = info.num_classes."""
    return MLP(math.prod(info.input_shape), list(hidden),
               info.num_classes or 0 if num_classes is None else num_classes, activation, dropout)
