"""Loaders that resume mid-epoch exactly: a seeded per-epoch order, sharded by rank, with a start.

Sample order depends only on (seed, epoch, rank, world size), never on global RNG state, so a run
stopped at any batch and resumed sees the same batches in the same order.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterator
from typing import Any, Optional

import torch
from torch.utils.data import DataLoader, Sampler


class ResumableSampler(Sampler[int]):
    """Per-epoch permutation (or identity), split across ranks like DistributedSampler.

    Args:
        size: dataset length.
        shuffle: permute each epoch with seed ``seed + epoch``.
        rank, world_size: this process's shard.
        drop_last: drop the tail that does not divide evenly among ranks (else pad by repeating).
    """

    def __init__(
        self,
        size: int,
        shuffle: bool,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        drop_last: bool = False,
    ):
        self.size, self.shuffle, self.seed = size, shuffle, seed
        self.rank, self.world_size, self.drop_last = rank, world_size, drop_last
        self.epoch, self.start = 0, 0
        if drop_last:
            self.per_rank = size // world_size
        else:
            self.per_rank = math.ceil(size / world_size)

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Begin ``epoch`` at sample ``start`` of this rank's shard (to resume mid-epoch)."""
        self.epoch, self.start = epoch, start

    def indices(self) -> list[int]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.size, generator=g).tolist()
        else:
            order = list(range(self.size))
        total = self.per_rank * self.world_size
        if total > len(order):
            order += order[: total - len(order)]  # pad, as DistributedSampler does
        return order[:total][self.rank :: self.world_size]

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices()[self.start :])

    def __len__(self) -> int:
        return self.per_rank - self.start


def _identity(batch):
    return batch


def useful_workers(dataset, num_workers: int) -> int:
    """``num_workers``, or 0 where worker processes can only slow the loader down: a dataset held
    in memory whose batch is one tensor gather (digits, in-memory tensors) does no work a worker
    could take over, and each batch would be pickled through a pipe instead (measured: 16k
    samples/s with 2 workers against 2.9M with none). Per-sample views (self-supervised tasks)
    are real work: they keep the workers."""
    if (
        num_workers
        and getattr(dataset, "batched", False)
        and isinstance(getattr(dataset, "inputs", None), torch.Tensor)
        and getattr(dataset, "view_transform", None) is None
    ):
        return 0
    return num_workers


def collate_fn(dataset):
    """Batched datasets collate themselves; others may name one (padding); else torch's default."""
    if getattr(dataset, "batched", False):
        return _identity
    return getattr(dataset, "collate_fn", None)


class _Recorded:
    """A batch sampler whose index lists are also queued, for the batches they become."""

    def __init__(self, batch_sampler, queue: deque):
        self.batch_sampler, self.queue = batch_sampler, queue

    def __iter__(self) -> Iterator[list[int]]:
        for indices in self.batch_sampler:
            self.queue.append(indices)
            yield indices

    def __len__(self) -> int:
        return len(self.batch_sampler)


class TrainLoader:
    """A DataLoader over a resumable batch sampler; worker seeds follow (seed, epoch).

    ``indices`` is the index list of the batch last yielded (the loader fetches ahead; batches
    come back in the sampler's order, so a queue pairs them).

    Args:
        batch_sampler: yields index lists; has ``set_epoch(epoch, start_batch)`` and
            ``batches_per_epoch()`` (see src/data/samplers.py).
    """

    def __init__(
        self, dataset, batch_sampler, seed: int, num_workers: int = 0, pin_memory: bool = False
    ):
        self.batch_sampler, self.seed = batch_sampler, seed
        self.generator = torch.Generator()
        self.num_workers = useful_workers(dataset, num_workers)
        self.queue: deque = deque()
        self.indices: list[int] = []
        self.loader = DataLoader(
            dataset,
            batch_sampler=_Recorded(batch_sampler, self.queue),
            num_workers=self.num_workers,
            pin_memory=pin_memory,
            generator=self.generator,
            collate_fn=collate_fn(dataset),
        )

    def batches_per_epoch(self) -> int:
        return self.batch_sampler.batches_per_epoch()

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.batch_sampler.set_epoch(epoch, start_batch)
        self.generator.manual_seed(self.seed * 100_003 + epoch)

    def __iter__(self):
        self.queue.clear()
        for batch in self.loader:
            self.indices = self.queue.popleft()
            yield batch


def sample_batch(dataset, n: int) -> dict[str, Any]:
    """The first ``n`` samples of ``dataset`` as one batch, collated as training collates."""
    from torch.utils.data import default_collate

    idx = list(range(min(n, len(dataset))))
    if getattr(dataset, "batched", False):
        return dataset.__getitems__(idx)
    items = [dataset[i] for i in idx]
    return (collate_fn(dataset) or default_collate)(items)


def sample_lengths(dataset) -> list[int]:
    """Every training sample's length in tokens (1 each where lengths do not apply)."""
    return list(getattr(dataset, "lengths", [1] * len(dataset)))


def sample_labels(dataset, sampler: str = "") -> torch.Tensor:
    """Every training sample's class label, for samplers that balance classes: the dataset's
    ``labels`` or ``targets`` where it keeps them, else read from each sample (which must hold
    one integer label)."""
    from src.core.errors import ConfigError

    labels = getattr(dataset, "labels", None)
    if labels is None:
        labels = getattr(dataset, "targets", None)
    if labels is None:
        labels = []
        for i in range(len(dataset)):
            sample = dataset[i]
            y = sample.get("labels") if isinstance(sample, dict) else None
            if not (
                isinstance(y, int)
                or (torch.is_tensor(y) and y.ndim == 0 and not y.is_floating_point())
            ):
                raise ConfigError(
                    f"data.sampler: sampler '{sampler}' balances classes, but "
                    f"sample {i} of the training data has no class label "
                    f"(its 'labels' is {_kind(y)})"
                )
            labels.append(int(y))
    return torch.as_tensor(labels)


def _kind(value) -> str:
    if torch.is_tensor(value):
        return f"a tensor of shape {tuple(value.shape)}"
    return "missing" if value is None else f"a {type(value).__name__}"


class EvalLoader:
    """In-order batches of this rank's share of a validation set, the same number on every rank.

    Rank ``r`` reads samples ``r, r + world, ...``: nothing is duplicated. Shares differ by at most
    one sample, so a rank can fall one batch short (or have no sample at all); it then gets
    *padding batches* (copies of its own first samples, or of sample 0) until every rank runs as
    many validation steps. Sharded models (FSDP, ZeRO-3) gather parameters in every forward, so a
    rank that ran fewer forwards would leave the others waiting forever. The trainer counts
    nothing of a padding batch: iterate to get ``(batch, is_padding)``.
    """

    def __init__(
        self,
        dataset,
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        num_workers: int = 0,
        pin_memory: bool = False,
    ):
        shard = list(range(rank, len(dataset), world_size))
        self.real_batches = math.ceil(len(shard) / batch_size)
        self.num_batches = math.ceil(math.ceil(len(dataset) / world_size) / batch_size)
        pad = (shard or [0])[:batch_size]
        batches = [shard[i : i + batch_size] for i in range(0, len(shard), batch_size)]
        batches += [pad] * (self.num_batches - self.real_batches)
        # Evaluation has no randomness: its workers live across evaluations (each would otherwise
        # start its processes again, which dominates a short validation split).
        workers = useful_workers(dataset, num_workers)
        self.loader = DataLoader(
            dataset,
            batch_sampler=batches,
            num_workers=workers,
            pin_memory=pin_memory,
            collate_fn=collate_fn(dataset),
            persistent_workers=workers > 0,
        )

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self) -> Iterator[tuple[Any, bool]]:
        for i, batch in enumerate(self.loader):
            yield batch, i >= self.real_batches


def eval_loader(
    dataset,
    batch_size: int,
    rank: int = 0,
    world_size: int = 1,
    num_workers: int = 0,
    pin_memory: bool = False,
) -> Optional[EvalLoader]:
    """An :class:`EvalLoader` over ``dataset`` (None when there is nothing to evaluate)."""
    if dataset is None or len(dataset) == 0:
        return None
    return EvalLoader(dataset, batch_size, rank, world_size, num_workers, pin_memory)
