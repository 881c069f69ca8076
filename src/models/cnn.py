"""A small convolutional network for small images (digits, CIFAR-sized folders)."""

from __future__ import annotations

from typing import Annotated, Optional

import torch
from pydantic import Field, NonNegativeInt, PositiveInt
from torch import nn

from src.core.dataset_info import DatasetInfo
from src.core.registry import MODELS


class GlobalAvgPool(nn.Module):
    """(B, C, H, W) -> (B, C) by a mean over H and W: unlike AdaptiveAvgPool2d, its backward has
    a deterministic CUDA kernel, so ``trainer.deterministic`` runs on a GPU."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(2, 3))


class SmallCNN(nn.Module):
    """Stages of two 3x3 conv-BN-ReLU layers, max-pooled between stages, then global average pool.

    (B, C, H, W) -> stages -> (B, channels[-1]) features -> dropout -> Linear -> (B, num_classes).
    ``num_classes=0`` returns the pooled features (``num_features`` wide).
    """

    def __init__(self, in_channels: int, num_classes: int, channels: list[int], dropout: float):
        super().__init__()
        stages: list[nn.Module] = []
        width = in_channels
        for i, c in enumerate(channels):
            if i:
                stages.append(nn.MaxPool2d(2, ceil_mode=True))
            for _ in range(2):
                stages += [
                    nn.Conv2d(width, c, 3, padding=1, bias=False),
                    nn.BatchNorm2d(c),
                    nn.ReLU(inplace=True),
                ]
                width = c
        self.features = nn.Sequential(*stages, GlobalAvgPool())
        self.num_features = width
        self.head = (
            nn.Sequential(nn.Dropout(dropout), nn.Linear(width, num_classes))
            if num_classes
            else nn.Identity()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


@MODELS.register("cnn")
def cnn(
    info: DatasetInfo,
    channels: Annotated[
        list[PositiveInt],
        Field(description="output channels of each conv block (each block halves the resolution)"),
    ] = [32, 64, 128],
    dropout: Annotated[float, Field(ge=0, lt=1, description="dropout before the classifier")] = 0.1,
    num_classes: Annotated[
        Optional[NonNegativeInt],
        Field(
            description="classifier outputs; 0 for a feature backbone, default: the data's classes"
        ),
    ] = None,
) -> SmallCNN:
    """SmallCNN with input channels and classes taken from the data."""
    return SmallCNN(
        info.input_shape[0],
        info.num_classes or 0 if num_classes is None else num_classes,
        list(channels),
        dropout,
    )
