"""DistributedDataParallel: every rank holds the whole model; gradients are all-reduced."""
from __future__ import annotations

import contextlib
from typing import Iterator, Optional

from pydantic import conint
from typing_extensions import override

from src.core.registry import STRATEGIES
from src.distributed.process_group import ProcessGroupStrategy


@STRATEGIES.register("ddp")
class DDPStrategy(ProcessGroupStrategy):
    """torch DistributedDataParallel; launch with torchrun (or the deepspeed launcher).

    Args:
        backend: ``auto`` (nccl on CUDA, gloo on CPU), or a torch.distributed backend name.
        timeout_s: a collective that waits longer than this for another rank fails the run
            with one line (a lost or out-of-step rank) instead of hanging.
        find_unused_parameters: for models whose forward skips parameters.
        static_graph: the same parameters are used every step (enables DDP's optimisations).
        bucket_cap_mb: gradient bucket size.
        sync_batchnorm: BatchNorm statistics over the global batch (as one process would see),
            instead of each rank's share.
    """

    name = "ddp"

    def __init__(self, backend: str = "auto", timeout_s: conint(gt=0) = 1800,
                 find_unused_parameters: bool = False, static_graph: bool = False,
                 bucket_cap_mb: Optional[conint(gt=0)] = None, sync_batchnorm: bool = False):
        super().__init__(backend, timeout_s)
        self.sync_batchnorm = sync_batchnorm
        self.ddp_kwargs = {"find_unused_parameters": find_unused_parameters,
                           "static_graph": static_graph, "gradient_as_bucket_view": True}
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
