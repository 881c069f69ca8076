"""Multi-view augmentations for self-supervised learning, on image tensors (torchvision v2).

A view transform maps one (C, H, W) tensor to a list of augmented views; the dataset stacks them
into ``batch["views"]`` = [view_0 (B, C, h0, w0), view_1, ...] beside the clean ``inputs``.
"""
from __future__ import annotations

from typing import Optional

import torch
from pydantic import confloat, conint

from src.core.registry import TRANSFORMS


def augmentation(size: int, scale: tuple[float, float], degrees: float, translate: float,
                 jitter: float, blur: float, flip: bool):
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
    """``n_views`` independently augmented copies at the same size (SimCLR, MoCo, BYOL, VICReg).

    Args:
        size: output side (default: the input's).
        scale: RandomResizedCrop area range.
        degrees, translate: RandomAffine.
        jitter: brightness/contrast strength (applied with p=0.8).
        blur: max Gaussian blur sigma (0 = off). flip: horizontal flips (off for digits).
    """

    def __init__(self, n_views: conint(ge=1) = 2, size: Optional[conint(gt=0)] = None,
                 scale: tuple[confloat(gt=0, le=1), confloat(gt=0, le=1)] = (0.5, 1.0),
                 degrees: confloat(ge=0) = 10.0, translate: confloat(ge=0, lt=1) = 0.1,
                 jitter: confloat(ge=0) = 0.4, blur: confloat(ge=0) = 0.0, flip: bool = False):
        self.n, self.size = n_views, size
        self.kw = dict(scale=tuple(scale), degrees=degrees, translate=translate, jitter=jitter,
                       blur=blur, flip=flip)
        self._aug = None

    def __call__(self, x: torch.Tensor) -> list[torch.Tensor]:
        if self._aug is None:
            self._aug = augmentation(self.size or x.shape[-1], **self.kw)
        return [self._aug(x) for _ in range(self.n)]


@TRANSFORMS.register("multi_crop")
class MultiCrop:
    """DINO's multi-crop: ``global_views`` large crops, then ``local_views`` small ones.

    Args:
        global_size, local_size: output sides (default: input side and half of it).
        global_scale, local_scale: crop area ranges.
    """

    def __init__(self, global_views: conint(ge=1) = 2, local_views: conint(ge=0) = 4,
                 global_size: Optional[conint(gt=0)] = None,
                 local_size: Optional[conint(gt=0)] = None,
                 global_scale: tuple[float, float] = (0.5, 1.0),
                 local_scale: tuple[float, float] = (0.2, 0.5), jitter: confloat(ge=0) = 0.4,
                 blur: confloat(ge=0) = 0.0):
        self.g, self.l = global_views, local_views
        self.sizes, self.scales = (global_size, local_size), (tuple(global_scale), tuple(local_scale))
        self.jitter, self.blur = jitter, blur
        self._augs = None

    def __call__(self, x: torch.Tensor) -> list[torch.Tensor]:
        if self._augs is None:
            side = x.shape[-1]
            gs, ls = self.sizes[0] or side, self.sizes[1] or max(2, side // 2)
            self._augs = (augmentation(gs, self.scales[0], 10.0, 0.1, self.jitter, self.blur, False),
                          augmentation(ls, self.scales[1], 10.0, 0.1, self.jitter, self.blur, False))
        return [self._augs[0](x) for _ in range(self.g)] + [self._augs[1](x) for _ in range(self.l)]
