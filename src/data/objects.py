"""Datasets given as Python objects (``Experiment.from_modules(train=..., val=...)``).

Any map-style dataset (``__getitem__`` and ``__len__``) or a DataLoader over one (its dataset and
``collate_fn`` are used; batching, order and sharding stay the platform's, so resume is exact
and ranks split the data). A sample ``(inputs, target)`` becomes ``{"inputs", "labels"}``; a
dict sample is kept as it is.
"""

from __future__ import annotations

from typing import Annotated, Any, Optional

from pydantic import Field

from src.core import objects
from src.core.dataset_info import DataModule, DatasetInfo
from src.core.errors import ConfigError
from src.core.registry import DATASETS


class Samples:
    """A user dataset whose samples read as ``{"inputs": ..., "labels": ...}`` dicts."""

    def __init__(self, dataset, collate_fn=None):
        self.dataset = dataset
        if collate_fn is not None:
            self.collate_fn = lambda rows: _as_dict(collate_fn(rows))

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> Any:
        sample = self.dataset[i]
        return sample if getattr(self, "collate_fn", None) is not None else _as_dict(sample)


def _as_dict(sample: Any) -> Any:
    if isinstance(sample, dict):
        return sample
    if isinstance(sample, (tuple, list)) and len(sample) == 2:
        return {"inputs": sample[0], "labels": sample[1]}
    if isinstance(sample, (tuple, list)) and len(sample) == 1:
        return {"inputs": sample[0]}
    return {"inputs": sample}


def _unwrap(obj: Any, path: str) -> Samples:
    from torch.utils.data import DataLoader

    if isinstance(obj, DataLoader):
        return Samples(
            obj.dataset,
            obj.collate_fn
            if obj.collate_fn.__module__ != "torch.utils.data._utils.collate"
            else None,
        )
    if not (hasattr(obj, "__getitem__") and hasattr(obj, "__len__")):
        raise ConfigError(
            f"{path}: a map-style dataset (__getitem__ and __len__) or a "
            f"DataLoader over one is needed (got {type(obj).__name__})"
        )
    return Samples(obj)


@DATASETS.register("objects")
def python_objects(
    train: Annotated[str, Field(description="the training dataset's reference (Python API)")],
    val: Annotated[Optional[str], Field(description="the validation dataset's reference")] = None,
    num_classes: Annotated[
        Optional[int], Field(gt=0, description="classes, for tasks and metrics that need them")
    ] = None,
) -> DataModule:
    """Datasets passed to ``Experiment.from_modules`` (samples ``(inputs, target)`` or dicts)."""
    import torch

    tr = _unwrap(objects.get(train, "data.train"), "data.train")
    va = _unwrap(objects.get(val, "data.val"), "data.val") if val else None
    if len(tr) == 0:
        raise ConfigError("data.train: the training dataset is empty")
    first = tr[0]
    inputs = first.get("inputs") if isinstance(first, dict) else None
    shape = tuple(inputs.shape) if isinstance(inputs, torch.Tensor) else ()
    info = DatasetInfo(
        num_samples=len(tr),
        num_classes=num_classes,
        class_names=tuple(str(i) for i in range(num_classes or 0)),
        input_shape=shape,
    )
    return DataModule(tr, va, info)
