"""Callbacks, one file each; every built-in is imported here so registration never depends on order."""

from src.core.callbacks import (
    cuda_memory,
    early_stopping,
    ema,
    gradient_monitor,
    lr_finder,
    lr_monitor,
    model_checkpoint,
    online_knn,
    online_probe,
    profiler,
    progress,
    rankme,
)
from src.core.callbacks.base import Callback
