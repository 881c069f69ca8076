"""Images on disk in the ImageFolder layout: ``root/<class_name>/<image>``."""

from __future__ import annotations

from typing import Annotated, Any, Literal, Optional

from pydantic import Field

from src.core.dataset_info import DataModule
from src.core.errors import ConfigError
from src.core.registry import DATASETS
from src.data.digits import stratified_split
from src.data.image_files import FileImages, LabelledImages, checked_listing, labelled_module
from src.data.image_transforms import Augment, ImageTransforms, NormalizeOption


def image_transform(size: int, channels: int):
    """An image (PIL) resized to ``size`` square, ``channels`` deep, in [0, 1]: the
    ``augment: none`` transform of every image dataset."""
    return ImageTransforms(size, channels).train


# Parameters of every dataset that reads image files.
ImageSize = Annotated[int, Field(gt=0, description="square side the images are resized to")]
ImageChannels = Annotated[int, Field(ge=1, le=3, description="1 (grey) or 3 (RGB)")]


# Parameters every dataset of image files shares.
BadFiles = Annotated[
    Literal["error", "skip"],
    Field(
        description="every image is checked once (header and structure, not pixels; the outcome is "
        "kept in the data cache): error stops at the first unreadable one with its path, skip "
        "leaves them out and says how many"
    ),
]
DecodeCache = Annotated[
    bool,
    Field(
        description="decode every image once, at image_size, into a uint8 memory-mapped array in "
        "the data cache; epochs then read pixels, not JPEGs (augmentation still runs per sample)"
    ),
]
CacheDir = Annotated[
    Optional[str],
    Field(
        description="the data cache (listings, shard indexes, decoded images; default "
        "$TESSERA_CACHE, else ~/.cache/tessera)"
    ),
]


@DATASETS.register("image_folder")
def image_folder(
    seed: int,
    root: Annotated[str, Field(description="training folder (one sub-folder per class)")],
    val_root: Annotated[
        Optional[str],
        Field(
            description="validation folder with the same classes; if absent, val_fraction of root is "
            "held out, stratified by class with seed"
        ),
    ] = None,
    val_fraction: Annotated[
        float,
        Field(
            ge=0.0,
            lt=1.0,
            description="fraction of the samples held out for validation when there is no val_root",
        ),
    ] = 0.2,
    image_size: ImageSize = 32,
    channels: ImageChannels = 3,
    augment: Augment = None,
    normalize: NormalizeOption = None,
    bad_files: BadFiles = "error",
    decode_cache: DecodeCache = False,
    cache_dir: CacheDir = None,
) -> DataModule:
    """Class-per-folder images: resized to ``image_size`` (or augmented with timm), in [0, 1]
    unless normalised. The folder is listed and checked once; later starts check only files that
    changed."""
    from src.data.token_store import cache_root

    cache = cache_root(cache_dir)
    transforms = ImageTransforms(image_size, channels, augment, normalize)
    full = checked_listing(root, "root", bad_files, cache)
    targets = [c for _, c in full.samples]
    if val_root is not None:
        val_listing = checked_listing(val_root, "val_root", bad_files, cache)
        if val_listing.classes != full.classes:
            raise ConfigError(
                f"data.val_root: classes {val_listing.classes} differ from root's {full.classes}"
            )
        listings = [full, val_listing]
        train_idx = list(range(len(full.samples)))
        val_idx = [len(full.samples) + i for i in range(len(val_listing.samples))]
    else:
        listings = [full]
        tr, va = stratified_split(targets, val_fraction, seed)
        train_idx, val_idx = tr.tolist(), va.tolist()
    samples = [s for listing in listings for s in listing.samples]
    # a JPEG decoded straight to about image_size when nothing crops it first
    draft = image_size if transforms.augment is None or decode_cache else None
    source: Any = FileImages([p for p, _ in samples], draft)
    if decode_cache:
        from src.data.decoded import decoded

        identity = [
            [p, *f] for listing in listings for (p, _), f in zip(listing.samples, listing.facts)
        ]
        source = decoded(source, identity, image_size, channels, cache)
    all_targets = [c for _, c in samples]
    train = LabelledImages(source, train_idx, [all_targets[i] for i in train_idx], transforms, True)
    val = LabelledImages(source, val_idx, [all_targets[i] for i in val_idx], transforms, False)
    extra = {
        "images_checked": sum(listing.checked for listing in listings),
        "decoded": decode_cache,
    }
    return labelled_module(train, val, full.classes, (channels, image_size, image_size), extra)
