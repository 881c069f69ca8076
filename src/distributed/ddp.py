"""DistributedDataParallel: every rank holds the whole model; gradients are all-reduced."""
from __future__ import annotations

import contextlib
import datetime
import gc
import re
from typing import Any, Iterator, Optional

import torch
import torch.distributed as dist
from pydantic import conint

from src.core.registry import STRATEGIES
from src.distributed.base import Strategy
from src.distributed.launch import launch_env


# What gloo and NCCL say when a peer never answers (timeout) or has gone away.
LOST_PEER = ("Timed out", "timed out", "Connection closed by peer", "Connection reset by peer",
             "NCCL communicator was aborted", "Watchdog caught collective operation timeout")


class ProcessGroupStrategy(Strategy):
    """What every multi-process strategy shares: the process group and the collectives."""

    name = "ddp"

    def __init__(self, backend: str = "auto", timeout_s: conint(gt=0) = 1800):
        self.backend_name, self.timeout_s = backend, timeout_s
        self._signal_work = None  # (async all-reduce, its tensor) of the last step's stop flag

    def setup(self) -> None:
        env = launch_env(self.name)
        cuda = torch.cuda.is_available()
        self.device = torch.device("cuda", env.local_rank) if cuda else torch.device("cpu")
        if cuda:
            torch.cuda.set_device(self.device)
        if not dist.is_initialized():
            backend = self.backend_name if self.backend_name != "auto" else self.auto_backend(cuda)
            dist.init_process_group(backend, timeout=datetime.timedelta(seconds=self.timeout_s),
                                    device_id=self.device if cuda else None)
        self.rank, self.local_rank = dist.get_rank(), env.local_rank
        self.world_size = dist.get_world_size()

    def auto_backend(self, cuda: bool) -> str:
        return "nccl" if cuda else "gloo"

    def reduce(self, values: dict[str, torch.Tensor], op: str = "sum") -> dict[str, torch.Tensor]:
        """One all-reduce for the whole dict (values stacked into one tensor)."""
        if not values:
            return values
        keys = list(values)
        flat = torch.stack([torch.as_tensor(values[k], device=self.device).float().reshape(())
                            for k in keys])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
        return dict(zip(keys, flat.unbind()))

    def all_finite(self, value: torch.Tensor) -> bool:
        flag = torch.isfinite(value).all().float().reshape(1).to(self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        return bool(flag.item())

    def step_decision(self, loss, grad_norm, signal: int) -> tuple[bool, int]:
        """The gradient norm is computed from all-reduced (or sharded and reduced) gradients, so
        it is the same number on every rank: deciding on it needs no extra collective; a
        non-finite loss anywhere makes every rank's gradients, and so the norm, non-finite.
        Stop signals are agreed with an asynchronous all-reduce read one step later, so no rank
        waits for it."""
        bad = not bool(torch.isfinite(grad_norm if grad_norm is not None else loss))
        if grad_norm is None:  # fp16: the loss alone, which differs per rank: agree on it
            flag = torch.tensor([float(bad)], device=loss.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            bad = bool(flag.item())
        return bad, self._agree_signal(signal)

    def _agree_signal(self, signal: int) -> int:
        agreed = 0
        if self._signal_work is not None:
            work, flag = self._signal_work
            work.wait()
            agreed = int(flag.item())
        flag = torch.tensor([float(signal)], device=self.device)
        self._signal_work = (dist.all_reduce(flag, op=dist.ReduceOp.MAX, async_op=True), flag)
        return agreed

    def gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """All ranks' tensors concatenated on dim 0 (ranks may hold different lengths)."""
        tensor = tensor.contiguous()
        n = torch.tensor([tensor.shape[0]], device=self.device)
        sizes = [torch.zeros_like(n) for _ in range(self.world_size)]
        dist.all_gather(sizes, n)
        longest = int(max(s.item() for s in sizes))
        padded = tensor.new_zeros((longest, *tensor.shape[1:]))
        padded[:tensor.shape[0]] = tensor
        out = [torch.zeros_like(padded) for _ in range(self.world_size)]
        dist.all_gather(out, padded)
        return torch.cat([o[:int(s.item())] for o, s in zip(out, sizes)])

    def broadcast(self, obj: Any, src: int = 0) -> Any:
        box = [obj]
        dist.broadcast_object_list(box, src=src)
        return box[0]

    def checkpoint_group(self):
        """A gloo group of its own, so background checkpoint writes never interleave with the
        training collectives on the default group."""
        if getattr(self, "_ckpt_group", None) is None:
            self._ckpt_group = dist.new_group(backend="gloo",
                                              timeout=datetime.timedelta(seconds=self.timeout_s))
        return self._ckpt_group

    def barrier(self) -> None:
        if dist.is_initialized():
            dist.barrier()

    def describe_failure(self, exc: BaseException) -> Optional[str]:
        text = str(exc)
        if isinstance(exc, dist.DistError) or any(s in text for s in LOST_PEER):
            first = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
            first = re.sub(r"^\[[^\]]*\]\s*", "", first).split(". ")[0][:160]  # no source path
            return (f"rank {self.rank}: a collective failed ({first}); another rank stopped "
                    f"or fell out of step (waits are bounded by strategy.timeout_s = "
                    f"{self.timeout_s})")
        return None

    def teardown(self, in_step: bool = True) -> None:
        """Wait for the last asynchronous collective, then destroy the groups while nothing else
        holds them: a pending work handle or group left for interpreter shutdown to free can
        outlive gloo's threads and abort the process at exit."""
        if dist.is_initialized():
            if self._signal_work is not None and in_step:
                self._signal_work[0].wait()
            self._signal_work, self._ckpt_group = None, None
            if in_step:
                dist.barrier()  # no rank tears the store down while another still talks to it
            gc.collect()
            dist.destroy_process_group()


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

    def wrap(self, task, make_optimizer=None):
        from torch.nn.parallel import DistributedDataParallel as DDP

        task = task.to(self.device)
        if self.sync_batchnorm:
            from src.distributed.sync_bn import convert_sync_batchnorm

            task = convert_sync_batchnorm(task, self.device)
        ids = [self.device.index] if self.device.type == "cuda" else None
        model = DDP(task, device_ids=ids, **self.ddp_kwargs)
        return model, make_optimizer(task) if make_optimizer else None

    def unwrap(self, model):
        return getattr(model, "module", model)

    @contextlib.contextmanager
    def no_sync(self, model) -> Iterator[None]:
        with model.no_sync():
            yield
