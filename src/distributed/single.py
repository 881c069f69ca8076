"""One process, one device."""
from __future__ import annotations

from src.core.registry import STRATEGIES
from src.distributed.base import Strategy, pick_device


@STRATEGIES.register("single")
class SingleDeviceStrategy(Strategy):
    """Everything on one device: ``auto`` picks cuda > mps > cpu.

    Args:
        device: ``auto``, ``cpu``, ``cuda``, ``cuda:1``, ``mps``.
    """

    def __init__(self, device: str = "auto"):
        self.device_name = device

    def setup(self) -> None:
        self.device = pick_device(self.device_name)
