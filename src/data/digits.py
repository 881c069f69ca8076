"""scikit-learn's digits: 1,797 real 8x8 grey images of handwritten digits, 10 classes.

The data ships inside scikit-learn, so the default experiment runs with no download. It is read
straight from scikit-learn's packaged file: importing ``sklearn.datasets`` for it cost every run
(and every rank) about 3 s of start-up.
"""

from __future__ import annotations

import functools
import importlib.util
import os
from typing import Annotated, Optional

import torch
from pydantic import Field, PositiveInt

from src.core.dataset_info import DataModule, DatasetInfo
from src.core.registry import DATASETS
from src.data.tensor_dataset import InMemoryDataset


def stratified_split(labels, val_fraction: float, seed: int):
    """Deterministic stratified (train_idx, val_idx): each class gives ``val_fraction`` of its
    samples (rounded) to validation, chosen by a generator seeded with ``seed``."""
    import numpy as np

    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    val = []
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        val.append(rng.permutation(members)[: int(round(val_fraction * len(members)))])
    val_idx = np.sort(np.concatenate(val)) if val else np.array([], dtype=int)
    train_idx = np.setdiff1d(np.arange(len(labels)), val_idx)
    return rng.permutation(train_idx), val_idx


def _packaged_file() -> Optional[str]:
    """scikit-learn's ``digits.csv.gz``, found without importing scikit-learn (None: not there)."""
    spec = importlib.util.find_spec("sklearn")
    if spec is None or not spec.origin:
        return None
    path = os.path.join(os.path.dirname(spec.origin), "datasets", "data", "digits.csv.gz")
    return path if os.path.isfile(path) else None


@functools.lru_cache(maxsize=1)
def load_digits_arrays():
    """(images (1797, 8, 8) float64 in 0..16, labels (1797,) int64), as
    ``sklearn.datasets.load_digits`` returns them, read from the file it reads."""
    import numpy as np

    path = _packaged_file()
    if path is None:  # another layout (or none): scikit-learn's own loader finds it or says why
        from sklearn.datasets import load_digits

        raw = load_digits()
        return raw.images, raw.target
    table = np.loadtxt(path, delimiter=",")
    return table[:, :-1].reshape(-1, 8, 8), table[:, -1].astype(np.int64)


def digit_images(resize: Optional[int], channels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The digits as (N, channels, S, S) floats in [0, 1] and their (N,) labels."""
    images, target = load_digits_arrays()
    x = torch.tensor(images, dtype=torch.float32).unsqueeze(1) / 16.0  # (N, 1, 8, 8)
    if resize is not None and resize != 8:
        x = torch.nn.functional.interpolate(
            x, size=(resize, resize), mode="bilinear", align_corners=False
        )
    if channels != 1:
        x = x.expand(-1, channels, -1, -1).contiguous()
    return x, torch.tensor(target, dtype=torch.long)


@DATASETS.register("digits")
def digits(
    seed: int,
    val_fraction: Annotated[
        float, Field(ge=0.0, lt=1.0, description="held-out fraction, stratified by class")
    ] = 0.2,
    resize: Annotated[
        Optional[PositiveInt],
        Field(description="bilinear resize of the images, done once up front"),
    ] = None,
    channels: Annotated[
        int, Field(gt=0, description="repeat the grey channel (3 for ImageNet-style backbones)")
    ] = 1,
) -> DataModule:
    """Digits as (channels, 8, 8) float images in [0, 1] (or ``resize`` x ``resize``)."""
    x, y = digit_images(resize, channels)
    train_idx, val_idx = stratified_split(y.numpy(), val_fraction, seed)
    train_idx, val_idx = torch.as_tensor(train_idx), torch.as_tensor(val_idx)
    counts = torch.bincount(y[train_idx], minlength=10)
    info = DatasetInfo(
        num_samples=len(train_idx),
        num_classes=10,
        class_names=tuple(str(c) for c in range(10)),
        class_counts=tuple(int(c) for c in counts),
        input_shape=tuple(x.shape[1:]),
    )
    return DataModule(
        InMemoryDataset(x[train_idx], y[train_idx]), InMemoryDataset(x[val_idx], y[val_idx]), info
    )
