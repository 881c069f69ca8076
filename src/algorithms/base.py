"""The Task contract: an algorithm owns its model, loss and evaluation, and nothing else.

A task never calls ``backward()``, never moves data between devices and never knows which
strategy runs it. The trainer calls the task through ``forward`` so that wrappers (DDP, FSDP)
see every call::

    out = task(batch)                 # -> training_step(batch) -> {"loss": ..., "accuracy": ...}
    out = task(batch, stage="val")    # -> validation_step(batch) -> {"loss": ..., ...}
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Protocol, cast

import torch
from torch import nn

from src.core.collectives import Collectives
from src.core.dataset_info import DatasetInfo


class CausalLM(Protocol):
    """What the language-model tasks call on their model: a Hugging Face causal LM, wrapped by
    PEFT when it trains an adapter (``disable_adapter`` exists then)."""

    config: Any

    def generate(self, **kwargs: Any) -> torch.Tensor: ...

    def disable_adapter(self) -> contextlib.AbstractContextManager[Any]: ...


@dataclass
class Inference:
    """A task's model as it is used after training (see :meth:`Task.inference`).

    Attributes:
        module: takes the tensors ``inputs`` names, positionally; returns one tensor.
        inputs: batch keys, in the module's argument order ("inputs"; "input_ids",
            "attention_mask").
        output: what the tensor is ("logits", "embedding", "features").
    """

    module: nn.Module
    inputs: tuple[str, ...] = ("inputs",)
    output: str = "logits"

    def inputs_of(self, batch: dict[str, Any]) -> tuple[torch.Tensor, ...]:
        missing = [k for k in self.inputs if batch.get(k) is None]
        if missing:
            from src.core.errors import UserError

            raise UserError(
                f"data: batches have no {', '.join(missing)}, which the model takes "
                f"(they hold {', '.join(sorted(batch))})"
            )
        return tuple(batch[k] for k in self.inputs)


class HFOutput(nn.Module):
    """A transformers model called with named tensors, returning one field of its output (the
    logits): a module with positional tensor arguments and one tensor out, as exporters want."""

    inputs: tuple[str, ...] = ("input_ids", "attention_mask")

    def __init__(self, model: nn.Module, field: str = "logits", attention_mask: bool = True):
        super().__init__()
        self.model, self.field = model, field
        if not attention_mask:
            self.inputs = ("input_ids",)

    def forward(
        self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        out = self.model(input_ids=input_ids, attention_mask=attention_mask)
        return getattr(out, self.field).float()


class Task(nn.Module):
    """Base class of every algorithm in TASKS.

    Subclasses implement ``training_step`` and usually ``validation_step``; they may override
    ``configure`` (build heads from the data), ``on_step_end`` (EMA teachers, queues),
    ``parameter_groups`` and ``validation_epoch_end`` (metrics over the whole split).
    Extra state that must survive a resume lives in buffers or ``get_extra_state``.
    """

    padding_batch = False  # set by the trainer around each validation step (see below)
    # Cross-rank operations (mean, gather, lockstep) for the task's own tensors; the
    # composition root hands in the strategy's. The default is one process's (identity).
    collectives = Collectives()

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    @property
    def causal_lm(self) -> CausalLM:
        """The model as a causal LM, for the tasks whose model is one (their config makes it a
        Hugging Face model)."""
        return cast(CausalLM, self.model)

    def configure(self, info: DatasetInfo) -> None:
        """Called once with the data's facts before the optimizer is built."""

    def train_views(self) -> Optional[dict[str, Any]]:
        """A TRANSFORMS section whose per-sample views the training batches should carry
        (``batch["views"]``), or None. Self-supervised tasks use it."""
        return None

    # Views made for the whole batch on its device (src/data/batch_views.py), set by the
    # composition root when ``train_views()`` names a batched transform.
    device_views = None

    def forward(self, batch: Any, stage: str = "train") -> dict[str, torch.Tensor]:
        """``training_step(batch)`` (``stage="train"``) or ``validation_step(batch)``: the
        strategy's wrapper calls the task, so both go through its forward."""
        if stage != "train":
            return self.validation_step(batch)
        if self.device_views is not None and "views" not in batch:
            with torch.no_grad():
                batch = {**batch, "views": self.device_views(batch["inputs"])}
        return self.training_step(batch)

    # Optimizer steps each loader batch serves: > 1 for a task that reuses what it made of a
    # batch (a rollout) for several updates (GRPO's num_iterations, PPO's ppo_epochs). The
    # trainer then hands the same batch to that many steps before drawing the next, so every
    # sample of an epoch is trained on exactly that many times, and counts it once.
    steps_per_batch = 1

    # True for a task that makes its own micro-batches in ``split`` (GRPO); the trainer (and
    # FSDP, which gathers the weights for it) call ``split`` only then.
    splits_batches = False

    def split(self, batch: dict[str, Any]) -> list[Any]:
        """The micro-batches one loader batch becomes (the default: the batch itself).

        A task that makes its training examples itself (GRPO's completions) makes them here,
        outside the forward, and returns them in chunks; the trainer runs forward and backward
        on each chunk alone (the memory of one chunk) and *adds* their losses: each chunk's loss
        must be its exact share of the batch's loss.
        """
        return [batch]

    def training_step(self, batch: Any) -> dict[str, torch.Tensor]:
        """Returns ``{"loss": scalar, **other scalar metrics}`` for one micro-batch: a batch of
        the loader's (a dict) or one of the micro-batches ``split`` made of it."""
        raise NotImplementedError(f"{type(self).__name__} must implement training_step")

    def validation_step(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """Scalar metrics of one batch; the trainer averages them weighted by batch size.

        Every rank runs the same number of validation steps: a rank whose share of the split is
        a batch short runs *padding batches* (``self.padding_batch`` is True), whose outputs the
        trainer drops. A task that records state across steps keeps nothing of them: record
        ``self.valid(tensor)``, which is the tensor itself, or its zero rows on a padding batch
        (so that the gathers of ``validation_epoch_end`` still run alike on every rank).
        """
        return {}

    def valid(self, *tensors: torch.Tensor):
        """``tensors`` (one: the tensor), cut to zero rows on a padding batch."""
        out = tuple(t[:0] for t in tensors) if self.padding_batch else tensors
        return out[0] if len(out) == 1 else out

    def validation_epoch_end(
        self, gather: Callable[[torch.Tensor], torch.Tensor]
    ) -> dict[str, Any]:
        """Metrics over the whole split (retrieval, confusion ...), after all validation steps.

        Args:
            gather: concatenates a tensor from every rank along dim 0 (identity in one process).
        """
        return {}

    def validation_texts(self) -> dict[str, str]:
        """Text to log after an evaluation (sampled generations ...): name -> text."""
        return {}

    def extra_state(self) -> dict[str, Any]:
        """Non-tensor state to checkpoint (tensors belong in buffers, saved with the weights)."""
        return {}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        """Restore what ``extra_state`` returned."""

    def rank_state(self) -> dict[str, Any]:
        """State that differs between ranks (PPO's current rollout), saved by every rank."""
        return {}

    def load_rank_state(self, state: dict[str, Any]) -> None:
        """Restore what ``rank_state`` returned (on this rank)."""

    def write_checkpoint_files(self, directory: Path) -> None:
        """Extra files of a checkpoint, written by the main process before its commit marker.
        A PEFT model's adapter is saved in PEFT's own layout (``PeftModel.from_pretrained``)."""
        model = getattr(self, "model", None)
        if model is not None and hasattr(model, "peft_config"):
            model.save_pretrained(str(directory / "adapter"))

    def generate(self, **kwargs) -> torch.Tensor:
        """``self.model.generate`` called as a forward of the task, for generation outside a
        training or validation step (samples after an evaluation). Under FSDP the task is the
        sharded root and this method is registered as one of its forwards, so its parameters
        are gathered for it; inside a step, call ``self.model.generate(...)`` with
        ``**self.collectives.lockstep()``."""
        return self.causal_lm.generate(**self.collectives.lockstep(), **kwargs)

    def inference(self) -> Inference:
        """What a trained model is used as: the module ``predict`` runs and ``export`` writes,
        the batch keys it takes (in order) and the name of what it returns. Tasks whose model
        has no such single use (RLHF, masked LM pre-training) keep this default, an error."""
        from src.core.errors import UserError

        raise UserError(
            f"task '{type(self).__name__}' has no inference model: predict and "
            "export --format onnx/torchscript/torch_export take classification, "
            "metric learning, self-supervised, sequence classification and causal LM "
            "runs (export --format safetensors takes any)"
        )

    def predict_step(self, batch: dict[str, Any], **options) -> dict[str, Any]:
        """Per-sample predictions of one batch: name -> (B, ...) tensor or list of B values.
        The default runs :meth:`inference` on the batch; classification returns ``probs``."""
        inf = self.inference()
        return {inf.output: inf.module(*inf.inputs_of(batch))}

    def write_artifacts(self, run_dir: Path) -> None:
        """Write files of the finished run (plots, tables) into ``run_dir``; main process only."""

    def on_step_end(self, step: int, max_steps: int) -> None:
        """After each optimizer step (momentum teachers, schedules of the algorithm itself)."""

    def parameter_groups(self) -> list[dict[str, Any]]:
        """Trainable parameters for the optimizer: biases and norm weights get no weight decay."""
        decay: list[nn.Parameter] = []
        no_decay: list[nn.Parameter] = []
        for name, p in self.named_parameters():
            if not p.requires_grad:
                continue
            (no_decay if p.ndim <= 1 or name.endswith(".bias") else decay).append(p)
        groups: list[dict[str, Any]] = [{"params": decay}]
        if no_decay:
            groups.append({"params": no_decay, "weight_decay": 0.0})
        return groups
