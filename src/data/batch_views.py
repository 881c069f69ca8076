"""Self-supervised views made for the whole batch at once, on the batch's device.

The per-sample views of :mod:`src.data.views` run torchvision once per image and view, in the
loader; these draw every image's random parameters as tensors and apply them to the batch in a
handful of tensor operations, inside the task's step, on the device the batch is on:

- geometry (random resized crop, rotation, translation, horizontal flip) is one affine map per
  image: one ``affine_grid`` + ``grid_sample`` for the batch (bilinear, zeros outside, as
  torchvision's crop-then-affine);
- colour: brightness, contrast (and saturation for RGB) jitter with p = 0.8 in a random order per
  image, grayscale with p, solarize with p;
- Gaussian blur with p = 0.5 and a sigma per image: a depthwise separable convolution with one
  kernel per image (reflect padding).

Every random number comes from torch's generator of that device, which the checkpoint holds, so
a resumed run draws the same views. Select them with ``task.views: {type: batch_views, ...}`` or
``{type: batch_multi_crop, ...}`` (the same options as ``views`` / ``multi_crop``).
"""

from __future__ import annotations

import math
from typing import Annotated, Optional

import torch
import torch.nn.functional as F
from pydantic import Field, PositiveInt

from src.core.registry import TRANSFORMS
from src.data.views import MultiCrop

RATIO = (0.8, 1.25)  # RandomResizedCrop's aspect-ratio range, as in the per-sample views


def _uniform(n: int, lo: float, hi: float, device) -> torch.Tensor:
    return torch.rand(n, device=device) * (hi - lo) + lo


def geometry(
    x: torch.Tensor,
    size: int,
    scale: tuple[float, float],
    degrees: float,
    translate: float,
    flip: bool,
) -> torch.Tensor:
    """Random resized crops of ``x`` (B, C, H, W) at ``size`` x ``size``, rotated, translated and
    flipped, each image by its own parameters."""
    b, dev = x.shape[0], x.device
    area = _uniform(b, *scale, dev)
    log_r = _uniform(b, math.log(RATIO[0]), math.log(RATIO[1]), dev)
    r = log_r.exp()
    w = (area * r).sqrt().clamp(max=1.0)  # crop width and height as fractions of the image
    h = (area / r).sqrt().clamp(max=1.0)
    cx = (torch.rand(b, device=dev) * 2 - 1) * (1 - w)  # centre in [-1, 1] coordinates
    cy = (torch.rand(b, device=dev) * 2 - 1) * (1 - h)
    theta = _uniform(b, -degrees, degrees, dev) * (math.pi / 180)
    tx, ty = (_uniform(b, -translate, translate, dev) * 2 for _ in range(2))
    sx = (
        torch.where(torch.rand(b, device=dev) < 0.5, -1.0, 1.0)
        if flip
        else torch.ones(b, device=dev)
    )
    cos, sin = theta.cos(), theta.sin()
    # output point p -> flip -> undo the affine (rotate back after removing the translation) ->
    # the crop's box in the input: input = c + diag(w, h) R(-theta) (diag(sx, 1) p - t)
    a11, a12 = cos * sx, sin
    a21, a22 = -sin * sx, cos
    mat = torch.stack(
        [
            torch.stack([w * a11, w * a12, cx - w * (cos * tx + sin * ty)], -1),
            torch.stack([h * a21, h * a22, cy - h * (-sin * tx + cos * ty)], -1),
        ],
        1,
    )
    grid = F.affine_grid(mat.to(x.dtype), [b, x.shape[1], size, size], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def _gray(x: torch.Tensor) -> torch.Tensor:
    if x.shape[1] == 3:
        return 0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3]
    return x.mean(1, keepdim=True)


def colour(
    x: torch.Tensor, jitter: float, saturation: float, grayscale: float, solarize: float
) -> torch.Tensor:
    """Brightness and contrast (and saturation) jitter with p = 0.8, in a random order per image,
    then grayscale and solarize (threshold 0.5) with their probabilities; values stay in [0, 1]."""
    b, dev = x.shape[0], x.device
    shape = (b, 1, 1, 1)
    if jitter or saturation:
        on = (torch.rand(shape, device=dev) < 0.8).to(x.dtype)
        bright = 1 + on * _uniform(b, -jitter, jitter, dev).view(shape)
        contrast = 1 + on * _uniform(b, -jitter, jitter, dev).view(shape)

        def brighten(t):
            return (t * bright).clamp(0, 1)

        def contrast_of(t):
            mean = _gray(t).mean((1, 2, 3), keepdim=True)
            return ((t - mean) * contrast + mean).clamp(0, 1)

        first = torch.rand(shape, device=dev) < 0.5
        x = torch.where(first, contrast_of(brighten(x)), brighten(contrast_of(x)))
        if saturation and x.shape[1] == 3:
            sat = 1 + on * _uniform(b, -saturation, saturation, dev).view(shape)
            g = _gray(x)
            x = ((x - g) * sat + g).clamp(0, 1)
    if grayscale and x.shape[1] == 3:
        x = torch.where(torch.rand(shape, device=dev) < grayscale, _gray(x).expand_as(x), x)
    if solarize:
        x = torch.where((torch.rand(shape, device=dev) < solarize) & (x >= 0.5), 1 - x, x)
    return x


def blur(x: torch.Tensor, max_sigma: float, p: float = 0.5) -> torch.Tensor:
    """Gaussian blur with probability ``p`` and sigma ~ U(0.1, max_sigma) per image."""
    b, c, hgt, wid = x.shape
    dev = x.device
    k = max(3, (hgt // 4) | 1)
    sigma = _uniform(b, 0.1, max_sigma, dev)
    sigma = torch.where(torch.rand(b, device=dev) < p, sigma, torch.zeros_like(sigma))
    r = torch.arange(k, device=dev, dtype=x.dtype) - k // 2
    kern = torch.exp(-(r[None] ** 2) / (2 * sigma[:, None].clamp(min=1e-6) ** 2))
    kern = kern / kern.sum(1, keepdim=True)  # sigma 0: a delta (no blur)
    kern = kern.repeat_interleave(c, 0)  # one kernel per (image, channel)
    y = x.reshape(1, b * c, hgt, wid)
    y = F.conv2d(
        F.pad(y, (k // 2, k // 2, 0, 0), mode="reflect"), kern[:, None, None, :], groups=b * c
    )
    y = F.conv2d(
        F.pad(y, (0, 0, k // 2, k // 2), mode="reflect"), kern[:, None, :, None], groups=b * c
    )
    return y.reshape(b, c, hgt, wid)


class _BatchViews:
    batched = True  # applied by the task to the batch on its device, not per sample
    # the augmentation's strengths, set by each kind's __init__
    degrees: float
    translate: float
    flip: bool
    jitter: float
    saturation: float
    grayscale: float
    solarize: float
    blur: float

    def _view(self, x: torch.Tensor, size: int, scale) -> torch.Tensor:
        v = geometry(x, size, scale, self.degrees, self.translate, self.flip)
        v = colour(v, self.jitter, self.saturation, self.grayscale, self.solarize)
        return blur(v, self.blur) if self.blur else v


@TRANSFORMS.register("batch_views")
class BatchMultiView(_BatchViews):
    """``views`` for the whole batch on its device: ``n_views`` augmented copies of each image."""

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
            Field(description="random resized crop's area range"),
        ] = (0.5, 1.0),
        degrees: Annotated[float, Field(ge=0, description="rotation range in degrees")] = 10.0,
        translate: Annotated[
            float, Field(ge=0, lt=1, description="translation as a fraction of the size")
        ] = 0.1,
        jitter: Annotated[
            float, Field(ge=0, description="brightness/contrast strength (applied with p=0.8)")
        ] = 0.4,
        saturation: Annotated[float, Field(ge=0, description="saturation strength (RGB)")] = 0.0,
        grayscale: Annotated[float, Field(ge=0, le=1, description="grayscale probability")] = 0.0,
        solarize: Annotated[float, Field(ge=0, le=1, description="solarize probability")] = 0.0,
        blur: Annotated[
            float, Field(ge=0, description="max Gaussian blur sigma, applied with p=0.5 (0 = off)")
        ] = 0.0,
        flip: Annotated[bool, Field(description="random horizontal flips")] = False,
    ):
        self.n, self.size, self.scale = n_views, size, tuple(scale)
        self.degrees, self.translate, self.flip = degrees, translate, flip
        self.jitter, self.saturation, self.grayscale = jitter, saturation, grayscale
        self.solarize, self.blur = solarize, blur

    def __call__(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [self._view(x, self.size or x.shape[-1], self.scale) for _ in range(self.n)]


@TRANSFORMS.register("batch_multi_crop")
class BatchMultiCrop(_BatchViews, MultiCrop):
    """``multi_crop`` for the whole batch on its device, with its options: ``global_views`` large
    crops, then ``local_views`` small ones."""

    degrees, translate, flip = 10.0, 0.1, False  # multi_crop's fixed affine and no flips
    saturation = grayscale = solarize = 0.0

    def __call__(self, x: torch.Tensor) -> list[torch.Tensor]:
        side = x.shape[-1]
        gs, ls = self.sizes[0] or side, self.sizes[1] or max(2, side // 2)
        return [self._view(x, gs, self.scales[0]) for _ in range(self.n_global)] + [
            self._view(x, ls, self.scales[1]) for _ in range(self.n_local)
        ]
