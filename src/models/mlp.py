"""A multi-layer perceptron that flattens its input."""

from __future__ import annotations

import math
from typing import Annotated, Literal, Optional

import torch
from pydantic import Field, NonNegativeInt, PositiveInt
from torch import nn

from src.core.dataset_info import DatasetInfo
from src.core.registry import MODELS

ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "tanh": nn.Tanh}


class MLP(nn.Module):
    """(B, *input_shape) -> flatten -> [Linear, act, dropout] x len(hidden) -> Linear -> (B, out).

    ``num_classes=0`` drops the last Linear: the model returns features of size ``hidden[-1]``.
    """

    def __init__(
        self,
        in_features: int,
        hidden: list[int],
        num_classes: int,
        activation: str = "relu",
        dropout: float = 0.0,
    ):
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
def mlp(
    info: DatasetInfo,
    hidden: Annotated[list[PositiveInt], Field(description="width of each hidden layer")] = [
        256,
        256,
    ],
    activation: Annotated[
        Literal["relu", "gelu", "silu", "tanh"], Field(description="activation between layers")
    ] = "relu",
    dropout: Annotated[
        float, Field(ge=0, lt=1, description="dropout after each hidden layer")
    ] = 0.0,
    num_classes: Annotated[
        Optional[NonNegativeInt],
        Field(description="outputs; 0 for a feature backbone, default: the data's classes"),
    ] = None,
) -> MLP:
    """MLP sized from the data: inputs = prod(info.input_shape), outputs = info.num_classes."""
    return MLP(
        math.prod(info.input_shape),
        list(hidden),
        info.num_classes or 0 if num_classes is None else num_classes,
        activation,
        dropout,
    )
