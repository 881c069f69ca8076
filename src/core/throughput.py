"""Model FLOPs utilisation: FLOPs of one measured training step against the device's peak."""
from __future__ import annotations

from typing import Optional

import torch

# Dense peak TFLOP/s by GPU name fragment: (16-bit tensor cores, fp32 or tf32). Datasheet values.
PEAK_TFLOPS: dict[str, tuple[float, float]] = {
    "H200": (989.0, 494.0),
    "H100 SXM": (989.0, 494.0),
    "H100 NVL": (835.0, 418.0),
    "H100": (756.0, 378.0),  # PCIe
    "A100": (312.0, 156.0),
    "L40S": (362.0, 183.0),
    "L4": (121.0, 60.0),
    "A10": (125.0, 62.5),
    "RTX 4090": (165.0, 82.6),
    "V100": (125.0, 15.7),
    "T4": (65.0, 8.1),
}


def peak_flops(device: torch.device, precision: str) -> Optional[float]:
    """Peak FLOP/s of ``device`` at ``precision``, or None when unknown (CPUs, unlisted GPUs)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for fragment, (half, full) in PEAK_TFLOPS.items():
        if fragment in name:
            return (half if precision in ("bf16", "fp16") else full) * 1e12
    return None


def measure_flops(fn) -> tuple[object, int]:
    """Run ``fn()`` under torch's FLOP counter; returns (its result, FLOPs counted)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        result = fn()
    return result, counter.get_total_flops()
