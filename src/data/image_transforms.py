"""How image files become training and evaluation tensors: resize only (``augment: none``), or
timm's ImageNet pipelines (``augment: timm`` or a mapping of their options), with optional
normalisation.

``augment: none`` resizes to ``image_size`` square and scales to [0, 1], for training and
evaluation alike. With timm, training images get a random resized crop, flips, colour jitter
or an automatic augmentation policy (RandAugment, AutoAugment, AugMix, TrivialAugment-like
``rand-...-mstd101``) and random erasing, from ``timm.data.create_transform``; evaluation images
are resized to ``image_size / crop_pct`` and centre-cropped, as timm evaluates.
``normalize`` subtracts a mean and divides by a standard deviation per channel (``imagenet``, or
given), after any augmentation; the default leaves images in [0, 1].
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Optional

import torch
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

from src.core.errors import ConfigError, library_message

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class TimmAugment(BaseModel):
    """Options of timm's training transform (``timm.data.create_transform``)."""

    model_config = ConfigDict(extra="forbid")
    crop_scale: tuple[float, float] = Field(
        (0.08, 1.0), description="area range of the random resized crop (fraction of the image)"
    )
    crop_ratio: tuple[float, float] = Field(
        (3 / 4, 4 / 3), description="aspect ratio range of the random resized crop"
    )
    hflip: float = Field(0.5, ge=0, le=1, description="probability of a horizontal flip")
    vflip: float = Field(0.0, ge=0, le=1, description="probability of a vertical flip")
    color_jitter: float = Field(0.4, ge=0, description="brightness/contrast/saturation jitter")
    auto_augment: Optional[str] = Field(
        None,
        description="timm policy string: rand-m9-mstd0.5-inc1 (RandAugment), original "
        "(AutoAugment), augmix-m5-w3, rand-m9-n1-mstd101 (TrivialAugment-like)",
    )
    re_prob: float = Field(0.0, ge=0, le=1, description="probability of random erasing")
    interpolation: Literal["bilinear", "bicubic", "nearest", "random"] = "bilinear"
    crop_pct: float = Field(
        0.875, gt=0, le=1, description="evaluation: resize to image_size / crop_pct, centre crop"
    )


class Normalize(BaseModel):
    model_config = ConfigDict(extra="forbid")
    mean: tuple[float, ...] = Field(description="per-channel mean (of images in [0, 1])")
    std: tuple[float, ...] = Field(description="per-channel standard deviation")


def _augment_option(value: Any) -> Any:
    if value is None or value == "none":
        return None
    if value == "timm":
        return {}
    if isinstance(value, str):
        raise ValueError(f"expected none, timm or a mapping of timm's options, got {value!r}")
    return value


def _normalize_option(value: Any) -> Any:
    if value is None or value == "none":
        return None
    if value == "imagenet":
        return {"mean": IMAGENET_MEAN, "std": IMAGENET_STD}
    if isinstance(value, str):
        raise ValueError(f"expected none, imagenet or {{mean: [...], std: [...]}}, got {value!r}")
    return value


Augment = Annotated[
    Optional[TimmAugment],
    BeforeValidator(_augment_option),
    Field(
        description="training augmentation: none (resize only), timm (random resized crop, flip, "
        "colour jitter), or a mapping of timm's options (auto_augment, re_prob, crop_scale, ...)"
    ),
]
NormalizeOption = Annotated[
    Optional[Normalize],
    BeforeValidator(_normalize_option),
    Field(description="none (images in [0, 1]), imagenet, or {mean: [...], std: [...]}"),
]


def _norm(normalize: Any, channels: int) -> Optional[tuple[tuple, tuple]]:
    normalize = _normalize_option(normalize)
    if normalize is None:
        return None
    if isinstance(normalize, dict):
        normalize = Normalize(**normalize)
    mean, std = tuple(normalize.mean), tuple(normalize.std)
    if channels == 1 and mean == IMAGENET_MEAN and std == IMAGENET_STD:
        mean, std = (sum(mean) / 3,), (sum(std) / 3,)
    if len(mean) != channels or len(std) != channels:
        raise ConfigError(
            f"data.normalize: mean and std need {channels} values (one per channel), "
            f"got {len(mean)} and {len(std)}"
        )
    if any(s <= 0 for s in std):
        raise ConfigError(f"data.normalize.std: must be > 0, got {list(std)}")
    return mean, std


def _grey_or_rgb(channels: int):
    from torchvision.transforms import v2

    return v2.Grayscale(num_output_channels=1) if channels == 1 else v2.RGB()


class ImageTransforms:
    """The training and evaluation transforms of one dataset: ``train(image)`` and
    ``eval(image)``, each a PIL image (or uint8 tensor) to a float (C, H, W) tensor. Picklable, so
    DataLoader workers get their own copy."""

    def __init__(self, size: int, channels: int, augment: Any = None, normalize: Any = None):
        from torchvision.transforms import v2

        self.size, self.channels = size, channels
        augment = _augment_option(augment)
        if isinstance(augment, dict):
            augment = TimmAugment(**augment)
        self.augment: Optional[TimmAugment] = augment if isinstance(augment, TimmAugment) else None
        self.norm = _norm(normalize, channels)
        if self.augment is None:
            self.train = self.eval = self.resized
            return
        tail = [v2.Normalize(list(self.norm[0]), list(self.norm[1]))] if self.norm else []
        try:
            self.train = v2.Compose([v2.RGB(), self._timm(True), _grey_or_rgb(channels)] + tail)
            self.eval = v2.Compose([v2.RGB(), self._timm(False), _grey_or_rgb(channels)] + tail)
        except (AssertionError, ValueError, KeyError, IndexError) as exc:
            raise ConfigError(
                f"data.augment: timm refused it ({library_message(exc, 100) or type(exc).__name__})"
            ) from None
        # a policy string is parsed lazily by some timm versions: try it once on a small image
        try:
            from PIL import Image

            self.train(Image.new("RGB", (size, size)))
        except Exception as exc:
            raise ConfigError(
                f"data.augment: timm refused it ({library_message(exc, 100) or type(exc).__name__})"
            ) from None

    def resized_uint8(self, image) -> torch.Tensor:
        """A PIL image as a uint8 (C, H, W) tensor, grey or RGB, resized to ``size`` square with
        antialiasing: torchvision's functional ops without ``v2.Compose``'s per-call dispatch."""
        import numpy as np
        from torchvision.transforms.v2 import functional as F

        if image.mode not in ("RGB", "L"):
            image = image.convert("RGB")
        arr = np.array(image)  # a copy: the tensor owns writable memory
        x = torch.from_numpy(arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1))
        if self.channels == 1 and x.shape[0] == 3:
            x = F.rgb_to_grayscale(x)
        elif self.channels == 3 and x.shape[0] == 1:
            x = x.expand(3, -1, -1)
        return F.resize(x, [self.size, self.size], antialias=True)

    def resized(self, image) -> torch.Tensor:
        """Resized, scaled to [0, 1] and normalised: what ``v2.Compose([ToImage, Grayscale or
        RGB, Resize, ToDtype, Normalize])`` gives, twice as fast."""
        return self.scaled(self.resized_uint8(image))

    def scaled(self, x: torch.Tensor) -> torch.Tensor:
        """A uint8 image as floats in [0, 1], normalised if asked."""
        from torchvision.transforms.v2 import functional as F

        out = F.to_dtype(x, torch.float32, scale=True)
        if self.norm is not None:
            out = F.normalize(out, list(self.norm[0]), list(self.norm[1]))
        return out

    def _timm(self, training: bool):
        from timm.data import create_transform

        _posterize_zero_bits()

        a = self.augment
        assert a is not None
        return create_transform(
            self.size,
            is_training=training,
            scale=a.crop_scale,
            ratio=a.crop_ratio,
            hflip=a.hflip,
            vflip=a.vflip,
            color_jitter=a.color_jitter,
            auto_augment=a.auto_augment,
            interpolation=a.interpolation
            if training or a.interpolation != "random"
            else "bilinear",
            re_prob=a.re_prob,
            crop_pct=a.crop_pct,
            mean=(0.0, 0.0, 0.0),  # normalised here, after the grey conversion
            std=(1.0, 1.0, 1.0),
        )


def _posterize(img, bits_to_keep, **kwargs):
    """timm's posterize, also for 0 bits (policies at full magnitude ask for it): no bit kept is a
    black image. Pillow 13 refuses ``ImageOps.posterize(img, 0)``."""
    from PIL import Image, ImageOps

    if bits_to_keep >= 8:
        return img
    if bits_to_keep <= 0:
        return Image.new(img.mode, img.size)
    return ImageOps.posterize(img, bits_to_keep)


def _posterize_zero_bits() -> None:
    from timm.data import auto_augment

    for name in ("Posterize", "PosterizeIncreasing", "PosterizeOriginal"):
        if name in auto_augment.NAME_TO_OP:
            auto_augment.NAME_TO_OP[name] = _posterize


def tensor_image(x: torch.Tensor, transforms: ImageTransforms, training: bool) -> torch.Tensor:
    """A decoded uint8 (C, H, W) image, already ``image_size`` square, through the dataset's
    transform: without augmentation only scaled (and normalised), with it through timm's PIL
    pipeline."""
    if transforms.augment is None:
        return transforms.scaled(x)  # exactly as the decoding path scales
    from torchvision.transforms.v2.functional import to_pil_image

    pil = to_pil_image(x)
    return transforms.train(pil) if training else transforms.eval(pil)
