"""DistributedDataParallel: every rank holds the whole model; gradients are all-reduced."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Annotated, Any, Optional

from pydantic import Field, PositiveInt
from typing_extensions import override

from src.core.registry import STRATEGIES
from src.distributed.process_group import Backend, ProcessGroupStrategy, Timeout


@STRATEGIES.register("ddp")
class DDPStrategy(ProcessGroupStrategy):
    """torch DistributedDataParallel; launch with torchrun (or the deepspeed launcher)."""

    name = "ddp"

    def __init__(
        self,
        backend: Backend = "auto",
        timeout_s: Timeout = 1800,
        find_unused_parameters: Annotated[
            bool, Field(description="for models whose forward skips parameters")
        ] = False,
        static_graph: Annotated[
            bool,
            Field(
                description="the same parameters are used every step (enables DDP's optimisations)"
            ),
        ] = False,
        bucket_cap_mb: Annotated[
            Optional[PositiveInt],
            Field(description="gradient bucket size in MiB (default: torch's)"),
        ] = None,
        sync_batchnorm: Annotated[
            bool,
            Field(
                description="BatchNorm statistics over the global batch (as one process would see), "
                "instead of each rank's share"
            ),
        ] = False,
    ):
        super().__init__(backend, timeout_s)
        self.sync_batchnorm = sync_batchnorm
        self.ddp_kwargs: dict[str, Any] = {
            "find_unused_parameters": find_unused_parameters,
            "static_graph": static_graph,
            "gradient_as_bucket_view": True,
        }
        if bucket_cap_mb:
            self.ddp_kwargs["bucket_cap_mb"] = bucket_cap_mb

    @override
    def wrap(self, task, make_optimizer=None):
        from torch.nn.parallel import DistributedDataParallel as DDP

        task = task.to(self.device)
        if self.sync_batchnorm:
            from src.distributed.sync_bn import convert_sync_batchnorm

            task = convert_sync_batchnorm(task, self.device)
        ids = [self.device.index] if self.device.type == "cuda" else None
        model = DDP(task, device_ids=ids, **self.ddp_kwargs)
        return model, make_optimizer(task) if make_optimizer else None

    @override
    def unwrap(self, model):
        return getattr(model, "module", model)

    @override
    @contextlib.contextmanager
    def no_sync(self, model) -> Iterator[None]:
        with model.no_sync():
            yield
