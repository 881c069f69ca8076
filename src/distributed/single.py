"""One process, one device."""

from __future__ import annotations

from typing import Annotated

import torch
from pydantic import Field
from typing_extensions import override

from src.core.registry import STRATEGIES
from src.distributed.base import Strategy, pick_device


@STRATEGIES.register("single")
class SingleDeviceStrategy(Strategy):
    """Everything on one device: ``auto`` picks cuda > mps > cpu."""

    def __init__(
        self,
        device: Annotated[str, Field(description="auto, cpu, cuda, cuda:1, mps")] = "auto",
    ):
        self.device_name = device

    @override
    def setup(self) -> None:
        self.device = pick_device(self.device_name)

    @override
    def wrap(self, task, make_optimizer=None):
        task = task.to(self.device)
        return task, make_optimizer(task) if make_optimizer else None

    @override
    def reduce(self, values: dict[str, torch.Tensor], op: str = "sum") -> dict[str, torch.Tensor]:
        return values

    @override
    def gather(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor

    @override
    def barrier(self) -> None:
        pass
