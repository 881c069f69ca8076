"""What a dataset tells the rest of the run: classes and input shape flow from data, never typed twice."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional


@dataclass(frozen=True)
class DatasetInfo:
    """Facts about the training data that models and tasks configure themselves from.

    Attributes:
        num_samples: training samples.
        num_classes: label classes (None for unlabelled data).
        class_names: one name per class index.
        class_counts: training samples per class index.
        input_shape: shape of one input, e.g. (C, H, W).
        extra: anything else a dataset knows (vocab_size, ...).
    """

    num_samples: int
    num_classes: Optional[int] = None
    class_names: tuple[str, ...] = ()
    class_counts: tuple[int, ...] = ()
    input_shape: tuple[int, ...] = ()
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class DataModule:
    """Train and validation datasets plus their DatasetInfo, as a DATASETS entry returns them."""

    train: Any
    val: Any
    info: DatasetInfo
