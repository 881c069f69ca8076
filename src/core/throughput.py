"""Model FLOPs utilisation: FLOPs of one measured training step against the device's peak."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Optional, TypeVar

import torch

T = TypeVar("T")

# Dense datasheet peaks in TFLOP/s, by GPU model: (16-bit tensor cores, TF32 tensor cores, plain
# FP32). Matched against torch.cuda.get_device_name() in this order, first match wins: specific
# variants come before their family, and names are whole words, so "L40" is not an "L4" and an
# "A10G" (not listed: set trainer.peak_tflops) is not an "A10". H100 without PCIe or NVL in its
# name ("NVIDIA H100 80GB HBM3") is the SXM card.
PEAK_TFLOPS: list[tuple[str, tuple[float, float, float]]] = [
    (r"\bH200\b", (989.0, 494.0, 67.0)),
    (r"\bH100\b.*\bPCIe\b", (756.0, 378.0, 51.0)),
    (r"\bH100 NVL\b", (835.0, 418.0, 60.0)),
    (r"\bH100\b", (989.0, 494.0, 67.0)),
    (r"\bA100\b", (312.0, 156.0, 19.5)),
    (r"\bL40S\b", (362.0, 183.0, 91.6)),
    (r"\bL40\b", (181.0, 90.5, 90.5)),
    (r"\bL4\b", (121.0, 60.0, 30.3)),
    (r"\bA10\b", (125.0, 62.5, 31.2)),
    (r"\bRTX 4090\b", (165.0, 82.6, 82.6)),
    (r"\bV100\b", (125.0, 15.7, 15.7)),  # no TF32: fp32 matmuls run on the FP32 units
    (r"\bT4\b", (65.0, 8.1, 8.1)),
]


def peak_tflops(name: str, precision: str, tf32: bool) -> Optional[float]:
    """Peak TFLOP/s of the GPU called ``name`` for ``precision`` (fp32 counts TF32 tensor cores
    only when TF32 matmuls are on); None for a GPU not in the table."""
    for pattern, (half, tf32_peak, fp32) in PEAK_TFLOPS:
        if re.search(pattern, name, re.IGNORECASE):
            if precision in ("bf16", "fp16"):
                return half
            return tf32_peak if tf32 else fp32
    return None


def peak_flops(device: torch.device, precision: str) -> Optional[float]:
    """Peak FLOP/s of ``device`` at ``precision``, or None when unknown (CPUs, unlisted GPUs)."""
    if device.type != "cuda":
        return None
    tf32 = torch.get_float32_matmul_precision() != "highest"
    peak = peak_tflops(torch.cuda.get_device_name(device), precision, tf32)
    return None if peak is None else peak * 1e12


def measure_flops(fn: Callable[[], T]) -> tuple[T, int]:
    """Run ``fn()`` under torch's FLOP counter; returns (its result, FLOPs counted)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        result = fn()
    return result, counter.get_total_flops()
