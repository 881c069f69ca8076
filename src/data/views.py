"""Multi-view augmentations for self-supervised learning, on image tensors (torchvision v2).

A view transform maps one (C, H, W) tensor to a list of augmented views; the dataset stacks them
into ``batch["views"]`` = [view_0 (B, C, h0, w0), view_1, ...] beside the clean ``inputs``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Annotated, Optional

import torch
from pydantic import Field, PositiveInt

from src.core.registry import TRANSFORMS

Augment = Callable[[torch.Tensor], torch.Tensor]


def augmentation(
    size: int,
    scale: tuple[float, float],
    degrees: float,
    translate: float,
    jitter: float,
    blur: float,
    flip: bool,
) -> Augment:
    """Random resized crop, affine, brightness/contrast jitter, optional blur and flip."""
    from torchvision.transforms import v2

    ops = [v2.RandomResizedCrop(size, scale=scale, ratio=(0.8, 1.25), antialias=True)]
    if degrees or translate:
        ops.append(v2.RandomAffine(degrees=degrees, translate=(translate, translate)))
    if flip:
        ops.append(v2.RandomHorizontalFlip())
    if jitter:
        ops.append(v2.RandomApply([v2.ColorJitter(brightness=jitter, contrast=jitter)], p=0.8))
    if blur:
        k = max(3, (size // 4) | 1)
        ops.append(v2.RandomApply([v2.GaussianBlur(k, sigma=(0.1, blur))], p=0.5))
    return v2.Compose(ops)


@TRANSFORMS.register("views")
class MultiView:
    """``n_views`` independently augmented copies at the same size (SimCLR, MoCo, BYOL, VICReg)."""

    def __init__(
        self,
        n_views: Annotated[
            int, Field(ge=1, le=64, description="augmented copies of each image")
        ] = 2,
        size: Annotated[
            Optional[PositiveInt], Field(description="output side (default: the input's)")
        ] = None,
        scale: Annotated[
            tuple[Annotated[float, Field(gt=0, le=1)], Annotated[float, Field(gt=0, le=1)]],
            Field(description="RandomResizedCrop area range"),
        ] = (0.5, 1.0),
        degrees: Annotated[
            float, Field(ge=0, description="RandomAffine rotation range in degrees")
        ] = 10.0,
        translate: Annotated[
            float,
            Field(ge=0, lt=1, description="RandomAffine translation as a fraction of the size"),
        ] = 0.1,
        jitter: Annotated[
            float, Field(ge=0, description="brightness/contrast strength (applied with p=0.8)")
        ] = 0.4,
        blur: Annotated[
            float, Field(ge=0, description="max Gaussian blur sigma, applied with p=0.5 (0 = off)")
        ] = 0.0,
        flip: Annotated[
            bool, Field(description="random horizontal flips (off for digits: a flipped 2 is no 2)")
        ] = False,
    ):
        self.n, self.size = n_views, size
        self._make = functools.partial(
            augmentation,
            scale=(scale[0], scale[1]),
            degrees=degrees,
            translate=translate,
            jitter=jitter,
            blur=blur,
            flip=flip,
        )
        self._aug: Optional[Augment] = None

    def __call__(self, x: torch.Tensor) -> list[torch.Tensor]:
        if self._aug is None:
            self._aug = self._make(self.size or x.shape[-1])
        return [self._aug(x) for _ in range(self.n)]


@TRANSFORMS.register("multi_crop")
class MultiCrop:
    """DINO's multi-crop: ``global_views`` large crops, then ``local_views`` small ones."""

    def __init__(
        self,
        global_views: Annotated[
            int, Field(ge=1, description="large crops (the teacher sees these)")
        ] = 2,
        local_views: Annotated[int, Field(ge=0, description="small crops (student only)")] = 4,
        global_size: Annotated[
            Optional[PositiveInt],
            Field(description="output sides (default: input side and half of it)"),
        ] = None,
        local_size: Annotated[
            Optional[PositiveInt],
            Field(description="output sides (default: input side and half of it)"),
        ] = None,
        global_scale: Annotated[
            tuple[float, float], Field(description="area range of the large crops")
        ] = (0.5, 1.0),
        local_scale: Annotated[
            tuple[float, float], Field(description="area range of the small crops")
        ] = (0.2, 0.5),
        jitter: Annotated[float, Field(ge=0, description="colour-jitter strength")] = 0.4,
        blur: Annotated[
            float, Field(ge=0, description="max Gaussian blur sigma, applied with p=0.5 (0 = off)")
        ] = 0.0,
    ):
        self.n_global, self.n_local = global_views, local_views
        self.sizes = (global_size, local_size)
        self.scales = ((global_scale[0], global_scale[1]), (local_scale[0], local_scale[1]))
        self.jitter, self.blur = jitter, blur
        self._augs: Optional[tuple[Augment, Augment]] = None

    def __call__(self, x: torch.Tensor) -> list[torch.Tensor]:
        if self._augs is None:
            side = x.shape[-1]
            gs, ls = self.sizes[0] or side, self.sizes[1] or max(2, side // 2)
            self._augs = (
                augmentation(gs, self.scales[0], 10.0, 0.1, self.jitter, self.blur, False),
                augmentation(ls, self.scales[1], 10.0, 0.1, self.jitter, self.blur, False),
            )
        return [self._augs[0](x) for _ in range(self.n_global)] + [
            self._augs[1](x) for _ in range(self.n_local)
        ]
