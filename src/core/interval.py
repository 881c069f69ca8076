"""The running sums between two log lines: step metrics, samples, tokens and time.

Kept as device tensors (one stack and one add per step, no host sync); read once per log interval
and checkpointed, so a resumed run logs the same averages bit for bit.
"""

from __future__ import annotations

import time
from typing import Any, Optional

import torch


def batch_size_of(batch: Any) -> int:
    """Number of samples in a batch (first dimension of its first tensor)."""
    if isinstance(batch, dict):
        batch = next(iter(batch.values()))
    if isinstance(batch, (list, tuple)):
        batch = batch[0]
    return int(batch.shape[0])


class IntervalMetrics:
    """Sums of each optimizer step's scalar outputs, and the samples, tokens and micro-batches
    seen, since the last ``reset``."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self._sums: dict[str, torch.Tensor] = {}  # keys that left the fast path below
        self._keys: tuple[str, ...] = ()
        self._vec: Optional[torch.Tensor] = None  # the sums of ``_keys``, stacked
        self.steps = self.samples = self.micros = 0
        self.tokens: Optional[torch.Tensor] = None
        self.t0 = time.perf_counter()

    def add_step(self, outputs: dict[str, torch.Tensor]) -> None:
        """Add one applied step's scalars: one stack and one add, no sync."""
        keys = tuple(outputs)
        dev = outputs[keys[0]].device  # the loss's; a gradient norm may sit on the CPU (offload)
        vec = torch.stack([outputs[k].float().to(dev, non_blocking=True) for k in keys])
        if keys == self._keys and self._vec is not None:
            self._vec += vec
        else:  # first step of an interval, or the task returned other keys
            for k, v in zip(self._keys, self._vec.unbind() if self._vec is not None else ()):
                self._sums[k] = self._sums.get(k, 0) + v
            self._keys, self._vec = keys, vec
        self.steps += 1

    def add_batch(self, batch: Any) -> None:
        """Count one micro-batch's samples (and tokens, for token batches)."""
        self.samples += batch_size_of(batch)
        self.micros += 1
        if isinstance(batch, dict) and "num_tokens" in batch:  # packed examples
            n = batch["num_tokens"]
            self.tokens = n if self.tokens is None else self.tokens + n
        elif isinstance(batch, dict) and ("attention_mask" in batch or "input_ids" in batch):
            mask = batch.get("attention_mask")
            n = mask.sum() if mask is not None else torch.tensor(batch["input_ids"].numel())
            self.tokens = n if self.tokens is None else self.tokens + n

    def sums(self) -> dict[str, torch.Tensor]:
        out = dict(self._sums)
        for k, v in zip(self._keys, self._vec.unbind() if self._vec is not None else ()):
            out[k] = out.get(k, 0) + v
        return out

    def elapsed(self) -> float:
        return max(time.perf_counter() - self.t0, 1e-9)

    def pause(self, seconds: float) -> None:
        """Leave ``seconds`` (evaluation, a checkpoint) out of the interval's time."""
        self.t0 += seconds

    def read(
        self,
        strategy,
        lr: float,
        flops_per_micro: Optional[int] = None,
        peak: Optional[float] = None,
    ) -> dict[str, float]:
        """The interval's ``train/...`` metrics: step means over every rank (one all-reduce, one
        host sync), the lr, samples (and tokens) per second, and TFLOP/s and MFU when known."""
        elapsed = self.elapsed()
        sums = self.sums()
        sums["_steps"] = torch.tensor(float(self.steps), device=strategy.device)
        if self.tokens is not None:
            sums["_tokens"] = self.tokens.to(strategy.device).float()
        totals = strategy.reduce(sums)
        steps = totals.pop("_steps")
        tokens = totals.pop("_tokens", None)
        names = list(totals)
        values = (
            (torch.stack([totals[k] for k in names]) / steps.clamp(min=1)).tolist() if names else []
        )
        metrics = {f"train/{k}": v for k, v in zip(names, values)}
        metrics["train/lr"] = lr
        metrics["train/samples_per_sec"] = self.samples * strategy.world_size / elapsed
        if tokens is not None:
            metrics["train/tokens_per_sec"] = float(tokens) / elapsed
        if peak and flops_per_micro:
            achieved = flops_per_micro * self.micros / elapsed
            metrics["train/tflops"] = achieved / 1e12
            metrics["train/mfu"] = achieved / peak
        return metrics

    def state_dict(self) -> dict[str, Any]:
        return {
            "sums": {k: v.cpu() for k, v in self.sums().items()},
            "steps": self.steps,
            "samples": self.samples,
            "tokens": None if self.tokens is None else self.tokens.cpu(),
        }

    def load_state_dict(self, state: dict[str, Any], device: torch.device) -> None:
        sums = {k: v.to(device) for k, v in state["sums"].items()}
        if sums:  # continue the same running sums, so the logged averages match bit for bit
            self._keys, self._vec = tuple(sums), torch.stack(list(sums.values()))
        self.steps, self.samples, self.tokens = state["steps"], state["samples"], state["tokens"]
