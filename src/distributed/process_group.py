"""What every multi-process strategy shares: the process group, its collectives, and the
agreement on skipped steps and stop signals."""

from __future__ import annotations

import datetime
import gc
import os
import re
from typing import Annotated, Any, Optional

import torch
import torch.distributed as dist
from pydantic import Field
from typing_extensions import override

from src.core.collectives import Collectives
from src.distributed.base import Strategy
from src.distributed.launch import launch_env

# Parameters every multi-process strategy takes.
Backend = Annotated[
    str, Field(description="auto (nccl on CUDA, gloo on CPU) or a torch.distributed backend")
]
Timeout = Annotated[
    int,
    Field(gt=0, description="a collective waiting longer than this fails the run with one line"),
]


class GroupCollectives(Collectives):
    """The collectives a task may use, over the default process group."""

    def __init__(self, world_size: int):
        self.world_size = world_size
        self.rank = dist.get_rank()

    @override
    @torch.no_grad()
    def mean(self, t: torch.Tensor) -> torch.Tensor:
        t = t.clone()
        dist.all_reduce(t)
        return t / self.world_size

    @override
    @torch.no_grad()
    def gather(self, t: torch.Tensor) -> torch.Tensor:
        out = [torch.empty_like(t) for _ in range(self.world_size)]
        dist.all_gather(out, t.contiguous())
        return torch.cat(out)

    @override
    def gather_with_grad(self, t: torch.Tensor) -> torch.Tensor:
        from torch.distributed.nn.functional import all_gather

        return torch.cat(all_gather(t.contiguous()))


# What gloo and NCCL say when a peer never answers (timeout) or has gone away.
LOST_PEER = (
    "Timed out",
    "timed out",
    "Connection closed by peer",
    "Connection reset by peer",
    "Application timeout caused pair closure",  # gloo, when the wait ran out mid-pair
    "NCCL communicator was aborted",
    "Watchdog caught collective operation timeout",
)


class ProcessGroupStrategy(Strategy):
    """What every multi-process strategy shares: the process group and the collectives."""

    name = "ddp"

    def __init__(self, backend: Backend = "auto", timeout_s: Timeout = 1800):
        self.backend_name, self.timeout_s = backend, timeout_s
        # (async all-reduce, its tensor) of the last step's stop flag
        self._signal_work: Optional[tuple[Any, torch.Tensor]] = None

    @override
    def setup(self) -> None:
        env = launch_env(self.name)
        cuda = torch.cuda.is_available()
        self.device = torch.device("cuda", env.local_rank) if cuda else torch.device("cpu")
        if cuda:
            torch.cuda.set_device(self.device)
        if not dist.is_initialized():
            backend = self.backend_name if self.backend_name != "auto" else self.auto_backend(cuda)
            timeout = datetime.timedelta(seconds=self.timeout_s)
            dist.init_process_group(
                backend,
                timeout=timeout,
                device_id=self.device if cuda else None,
                **self._restart_store(env, timeout),
            )
        self.rank, self.local_rank = dist.get_rank(), env.local_rank
        self.world_size = dist.get_world_size()

    @staticmethod
    def _restart_store(env, timeout) -> dict:
        """After torchrun restarted the workers (``--max-restarts``), the launcher's store still
        holds the keys the previous workers' groups published (gloo addresses of processes now
        dead): the restarted group gets its own key space, or a sub-group (FSDP's mesh, the
        checkpoint group) would dial a dead peer."""
        restart = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)
        if not restart:
            return {}
        agent = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
        store = dist.TCPStore(
            os.environ["MASTER_ADDR"],
            int(os.environ["MASTER_PORT"]),
            env.world_size,
            is_master=env.rank == 0 and not agent,
            timeout=timeout,
            multi_tenant=True,
        )
        return {
            "store": dist.PrefixStore(f"restart_{restart}/", store),
            "rank": env.rank,
            "world_size": env.world_size,
        }

    def auto_backend(self, cuda: bool) -> str:
        return "nccl" if cuda else "gloo"

    @override
    def collectives(self) -> Collectives:
        return GroupCollectives(self.world_size) if self.world_size > 1 else Collectives()

    @override
    def reduce(self, values: dict[str, torch.Tensor], op: str = "sum") -> dict[str, torch.Tensor]:
        """One all-reduce for the whole dict (values stacked into one tensor)."""
        if not values:
            return values
        keys = list(values)
        flat = torch.stack(
            [torch.as_tensor(values[k], device=self.device).float().reshape(()) for k in keys]
        )
        dist.all_reduce(flat, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
        return dict(zip(keys, flat.unbind()))

    @override
    def all_finite(self, value: torch.Tensor) -> bool:
        flag = torch.isfinite(value).all().float().reshape(1).to(self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        return bool(flag.item())

    @override
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

    @override
    def gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """All ranks' tensors concatenated on dim 0 (ranks may hold different lengths)."""
        tensor = tensor.contiguous()
        n = torch.tensor([tensor.shape[0]], device=self.device)
        sizes = [torch.zeros_like(n) for _ in range(self.world_size)]
        dist.all_gather(sizes, n)
        longest = int(max(s.item() for s in sizes))
        padded = tensor.new_zeros((longest, *tensor.shape[1:]))
        padded[: tensor.shape[0]] = tensor
        out = [torch.zeros_like(padded) for _ in range(self.world_size)]
        dist.all_gather(out, padded)
        return torch.cat([o[: int(s.item())] for o, s in zip(out, sizes)])

    @override
    def checkpoint_group(self):
        """A gloo group of its own, so background checkpoint writes never interleave with the
        training collectives on the default group."""
        if getattr(self, "_ckpt_group", None) is None:
            self._ckpt_group = dist.new_group(
                backend="gloo", timeout=datetime.timedelta(seconds=self.timeout_s)
            )
        return self._ckpt_group

    @override
    def barrier(self) -> None:
        if dist.is_initialized():
            dist.barrier()

    @override
    def describe_failure(self, exc: BaseException) -> Optional[str]:
        text = str(exc)
        if isinstance(exc, dist.DistError) or any(s in text for s in LOST_PEER):
            first = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
            first = re.sub(r"^\[[^\]]*\]\s*", "", first).split(". ")[0][:160]  # no source path
            return (
                f"rank {self.rank}: a collective failed ({first}); another rank stopped "
                f"or fell out of step (waits are bounded by strategy.timeout_s = "
                f"{self.timeout_s})"
            )
        return None

    @override
    def teardown(self, in_step: bool = True, keep_group: bool = False) -> None:
        """Wait for the last asynchronous collective, then destroy the groups while nothing else
        holds them: a pending work handle or group left for interpreter shutdown to free can
        outlive gloo's threads and abort the process at exit. ``keep_group`` keeps the default
        group (a sweep runs its next trial on it) and frees this run's own sub-group."""
        if dist.is_initialized():
            if self._signal_work is not None and in_step:
                self._signal_work[0].wait()
            ckpt_group = getattr(self, "_ckpt_group", None)
            self._signal_work, self._ckpt_group = None, None
            if in_step:
                dist.barrier()  # no rank tears the store down while another still talks to it
            gc.collect()
            if not keep_group:
                dist.destroy_process_group()
            elif ckpt_group is not None:
                dist.destroy_process_group(ckpt_group)
