"""What of a run a strategy may need to know: :class:`LoopSettings`, made from the validated
config by :meth:`LoopSettings.of` (a strategy gets this, never the whole experiment config)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional


@dataclass(frozen=True)
class LoopSettings:
    """Facts of the training loop and of the model that decide what a strategy can run.

    Attributes:
        batch_size: samples per micro-step over all ranks (``data.batch_size``).
        grad_accum_steps: micro-steps per optimizer step.
        grad_clip: max gradient norm, or None.
        precision: ``fp32``, ``bf16`` or ``fp16`` (``trainer.precision``).
        compile: whether the trainer compiles the model (``trainer.compile``).
        async_save: whether checkpoints are written in the background.
        optimizer: the optimizer's registered name (``optimizer.type``).
        skip_loss_spikes: whether the trainer may skip an update for a loss spike
            (``trainer.loss_spike_sigmas``): a strategy whose engine always steps refuses it.
        weights_dtype: the dtype the model's weights are built in (``model.dtype``), or None.
        adapter: the model's adapter type (``model.adapter.type``: lora, qlora ...), or None.
    """

    batch_size: int = 1
    grad_accum_steps: int = 1
    grad_clip: Optional[float] = None
    precision: str = "fp32"
    compile: bool = False
    async_save: bool = False
    optimizer: str = "adamw"
    skip_loss_spikes: bool = False
    weights_dtype: Optional[str] = None
    adapter: Optional[str] = None

    @classmethod
    def of(cls, cfg: Any) -> LoopSettings:
        """The settings of a validated :class:`~src.core.config.ExperimentConfig`."""
        t = cfg.trainer
        adapter = cfg.model.get("adapter")
        return cls(
            batch_size=cfg.data.batch_size,
            grad_accum_steps=t.grad_accum_steps,
            grad_clip=t.grad_clip,
            precision=t.precision,
            compile=t.compile,
            async_save=cfg.checkpoint.async_save,
            optimizer=cfg.optimizer["type"],
            skip_loss_spikes=t.loss_spike_sigmas is not None,
            weights_dtype=cfg.model.get("dtype"),
            adapter=adapter.get("type") if isinstance(adapter, dict) else None,
        )
