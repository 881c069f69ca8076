"""Log the peak CUDA memory of each logging interval."""

from __future__ import annotations

import torch

from src.core.callbacks.base import Callback
from src.core.registry import CALLBACKS


@CALLBACKS.register("cuda_max_memory")
class CudaMaxMemory(Callback):
    """Adds ``train/max_memory_gib`` (peak allocated since the last log) on a CUDA device."""

    def on_fit_start(self, trainer) -> None:
        self.device = trainer.strategy.device
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        elif trainer.strategy.is_main:
            print(f"cuda_max_memory: device is {self.device}, nothing to measure", flush=True)

    def on_log(self, trainer, metrics: dict[str, float]) -> None:
        if self.device.type == "cuda" and any(k.startswith("train/") for k in metrics):
            metrics["train/max_memory_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
            torch.cuda.reset_peak_memory_stats(self.device)
