"""Fully sharded data parallel (FSDP2, ``fully_shard``): parameters, gradients and optimizer state
are sharded over ranks; each block is gathered just in time for its forward and backward."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any, Literal, Optional

import torch
from pydantic import Field
from typing_extensions import override

from src.core.checkpoint import TRAINER_FILE
from src.core.errors import CheckpointError, ConfigError
from src.core.registry import STRATEGIES
from src.distributed.base import LoopSettings, safe_load
from src.distributed.dcp_io import has_dcp, load_dcp
from src.distributed.process_group import Backend, ProcessGroupStrategy, Timeout

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, None: None}
Precision = Optional[Literal["fp32", "bf16", "fp16"]]


def block_classes(task: torch.nn.Module, names: list[str]) -> tuple[type, ...]:
    """The module classes to shard one by one.

    Given ``names``, the classes of those names found in the model (an unknown name is an error
    listing the classes there are). Otherwise detected: a transformers model's
    ``_no_split_modules``, else the children of a timm-style ``blocks`` / ``layers`` / ``stages``.
    """
    present = {type(m).__name__: type(m) for m in task.modules()}
    if names:
        unknown = [n for n in names if n not in present]
        if unknown:
            raise ConfigError(
                f"strategy.wrap_classes: {unknown} not in the model; its classes: "
                f"{', '.join(sorted(present))}"
            )
        return tuple(present[n] for n in names)
    model = getattr(task, "model", task)
    no_split = getattr(model, "_no_split_modules", None)
    if no_split:
        return tuple(present[n] for n in no_split if n in present)
    for attr in ("blocks", "layers", "stages", "layer"):
        seq = getattr(model, attr, None)
        if isinstance(seq, (torch.nn.ModuleList, torch.nn.Sequential)) and len(seq):
            return tuple({type(m) for m in seq})
    return ()


@STRATEGIES.register("fsdp")
class FSDPStrategy(ProcessGroupStrategy):
    """FSDP2 over all ranks; launch with torchrun."""

    name = "fsdp"

    def __init__(
        self,
        backend: Backend = "auto",
        timeout_s: Timeout = 1800,
        wrap_classes: Annotated[
            list[str],
            Field(
                description="class names of the blocks to shard individually (default: detected)"
            ),
        ] = [],
        param_dtype: Annotated[
            Precision,
            Field(
                description="dtype of parameters in forward/backward (mixed precision), e.g. bf16"
            ),
        ] = None,
        reduce_dtype: Annotated[
            Precision, Field(description="dtype of the gradient reduce-scatter")
        ] = None,
        cpu_offload: Annotated[
            bool,
            Field(description="keep sharded parameters, gradients and optimizer state on the CPU"),
        ] = False,
        activation_checkpointing: Annotated[
            bool, Field(description="recompute each block's activations in backward")
        ] = False,
        reshard_after_forward: Annotated[
            bool,
            Field(
                description="free gathered parameters after forward (saves memory, costs a second all-"
                "gather in backward)"
            ),
        ] = True,
        sync_batchnorm: Annotated[
            bool,
            Field(
                description="BatchNorm statistics over the global batch, as one process sees them"
            ),
        ] = False,
    ):
        super().__init__(backend, timeout_s)
        self.sync_batchnorm = sync_batchnorm
        self.wrap_names, self.cpu_offload = list(wrap_classes), cpu_offload
        self.param_dtype, self.reduce_dtype = DTYPES[param_dtype], DTYPES[reduce_dtype]
        self.activation_checkpointing = activation_checkpointing
        self.reshard_after_forward = reshard_after_forward
        self.blocks: tuple[type, ...] = ()
        self.compile_blocks = False

    @override
    @classmethod
    def config_errors(cls, section: dict[str, Any], settings: LoopSettings) -> list[str]:
        lines = super().config_errors(section, settings)
        if settings.adapter == "qlora":
            lines.append(
                "model.adapter.type: qlora's 4-bit weights cannot be sharded by fsdp; "
                "use ddp or ZeRO stage 1-2, or lora"
            )
        return lines

    @override
    def configure(self, settings: LoopSettings) -> None:
        super().configure(settings)
        self.compile_blocks = settings.compile
        if self.cpu_offload and self.device.type != "cuda":
            raise ConfigError(
                "strategy.cpu_offload: offloads a GPU's parameters to the CPU; "
                f"this run is on {self.device.type}: leave it off"
            )

    @override
    def auto_backend(self, cuda: bool) -> str:
        """With cpu_offload the gradients (and so clipping norms, GradScaler's inf checks) are
        CPU tensors: they need gloo beside NCCL, as torchtitan sets it up."""
        return "cuda:nccl,cpu:gloo" if cuda and self.cpu_offload else super().auto_backend(cuda)

    @override
    def compile(self, model) -> None:
        """Done in ``wrap``: per block, before sharding (a compiled root would split its graph
        at every block's hooks)."""

    @override
    def wrap(self, task, make_optimizer=None):
        from torch.distributed.fsdp import (
            CPUOffloadPolicy,
            MixedPrecisionPolicy,
            OffloadPolicy,
            fully_shard,
            register_fsdp_forward_method,
        )

        if self.sync_batchnorm:
            from src.distributed.sync_bn import convert_sync_batchnorm

            task = convert_sync_batchnorm(task, self.device)
        self.blocks = block_classes(task, self.wrap_names)
        if self.activation_checkpointing:
            if not self.blocks:
                raise ConfigError(
                    "strategy.activation_checkpointing: no blocks found to "
                    "checkpoint; name them in strategy.wrap_classes"
                )
            from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
                apply_activation_checkpointing,
            )

            apply_activation_checkpointing(task, check_fn=lambda m: isinstance(m, self.blocks))
        if not self.cpu_offload:
            task = task.to(self.device)
        kw = dict(
            mp_policy=MixedPrecisionPolicy(
                param_dtype=self.param_dtype, reduce_dtype=self.reduce_dtype
            ),
            offload_policy=CPUOffloadPolicy() if self.cpu_offload else OffloadPolicy(),
            reshard_after_forward=self.reshard_after_forward,
        )
        blocks = [
            m
            for m in task.modules()
            if self.blocks and isinstance(m, self.blocks) and m is not task
        ]
        if self.compile_blocks:  # each block compiled alone, before its FSDP hooks (torchtitan)
            for m in blocks or [task]:
                m.compile()
        for m in blocks:
            fully_shard(m, **kw)
        fully_shard(task, **kw)
        if hasattr(task, "generate"):  # generation outside a step gathers the root's weights too
            register_fsdp_forward_method(task, "generate")
        if getattr(task, "splits_batches", False):  # so do the chunks a task makes (GRPO)
            register_fsdp_forward_method(task, "split")
        return task, make_optimizer(task) if make_optimizer else None

    @override
    @contextlib.contextmanager
    def no_sync(self, model) -> Iterator[None]:
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)

    @override
    def clip_grad_norm(self, model, max_norm):
        params = [p for p in self.trainable(model) if p.grad is not None]
        norm = torch.nn.utils.clip_grad_norm_(
            params, max_norm if max_norm is not None else float("inf"), foreach=True
        )
        return norm.full_tensor() if hasattr(norm, "full_tensor") else norm

    @override
    def save(
        self,
        directory: Path,
        model,
        optimizer,
        trainer_state: dict,
        rank_state: dict,
        async_save: bool = False,
    ):
        future = self._save_sharded(directory, model, optimizer, async_save)
        self._save_small(directory, trainer_state, rank_state)
        return future

    @override
    def load(self, directory: Path, model, optimizer):
        if not has_dcp(directory):
            raise CheckpointError(
                f"{directory}: not a sharded (DCP) checkpoint; it was written by "
                "the single or ddp strategy: resume it with that strategy, or "
                "start from its weights with `export` and a model's pretrained path"
            )
        load_dcp(directory, model, optimizer)
        return safe_load(directory / TRAINER_FILE), self._rank_state(directory)
