"""Batch samplers that resume mid-epoch: the order of an epoch depends only on (seed, epoch), and
every rank takes its share of each global batch, so N ranks see what one process would.

Each has ``set_epoch(epoch, start_batch)``, ``batches_per_epoch()``, and yields index lists.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Annotated

import torch
from pydantic import Field

from src.core.errors import ConfigError
from src.core.registry import SAMPLERS
from src.data.loader import ResumableSampler


class ShardedBatchSampler:
    """Batches of ``batch_size`` from this rank's shard of the epoch's order (the default)."""

    def __init__(
        self,
        size: int,
        batch_size: int,
        seed: int,
        shuffle: bool = True,
        rank: int = 0,
        world_size: int = 1,
        drop_last: bool = True,
    ):
        self.sampler = ResumableSampler(size, shuffle, seed, rank, world_size, drop_last)
        self.batch_size, self.drop_last, self.start = batch_size, drop_last, 0

    def batches_per_epoch(self) -> int:
        n = self.sampler.per_rank
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.sampler.set_epoch(epoch)
        self.start = start_batch

    def __iter__(self) -> Iterator[list[int]]:
        idx = self.sampler.indices()
        for b in range(self.start, self.batches_per_epoch()):
            yield idx[b * self.batch_size : (b + 1) * self.batch_size]

    def __len__(self) -> int:
        return self.batches_per_epoch() - self.start


class _GlobalBatches:
    """Base of samplers that draw whole global batches and hand each rank every world-th item."""

    def __init__(self, size: int, batch_size: int, seed: int, rank: int, world_size: int):
        self.size, self.batch_size, self.seed = size, batch_size, seed
        self.rank, self.world = rank, world_size
        self.epoch = self.start = 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start = epoch, start_batch

    def batches_per_epoch(self) -> int:
        return self.size // (self.batch_size * self.world)

    def global_batches(self, g: torch.Generator) -> list[list[int]]:
        raise NotImplementedError

    def __iter__(self) -> Iterator[list[int]]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        for batch in self.global_batches(g)[self.start :]:
            yield batch[self.rank :: self.world]

    def __len__(self) -> int:
        return self.batches_per_epoch() - self.start


@SAMPLERS.register("pk")
class PKSampler(_GlobalBatches):
    """P classes x K samples per global batch (metric learning): every batch holds positives.

    Classes with fewer than K samples are drawn with replacement. With several ranks each gets
    K / world samples of every one of the P classes.
    """

    def __init__(
        self,
        labels: torch.Tensor,
        batch_size: int,
        seed: int,
        rank: int,
        world_size: int,
        classes_per_batch: Annotated[
            int, Field(ge=1, description="P: classes in each global batch")
        ] = 8,
        samples_per_class: Annotated[
            int, Field(ge=2, description="K (a multiple of the world size)")
        ] = 4,
    ):
        P, K = classes_per_batch, samples_per_class
        if P * K != batch_size * world_size:
            raise ConfigError(
                f"data.sampler: classes_per_batch x samples_per_class = {P * K} "
                f"must equal data.batch_size = {batch_size * world_size}"
            )
        if K % world_size:
            raise ConfigError(
                f"data.sampler.samples_per_class: {K} does not divide among {world_size} processes"
            )
        classes = labels.unique()
        if P > len(classes):
            raise ConfigError(f"data.sampler.classes_per_batch: {P} > {len(classes)} classes")
        super().__init__(len(labels), batch_size, seed, rank, world_size)
        self.P, self.K = P, K
        self.by_class = [torch.nonzero(labels == c).flatten() for c in classes]

    def global_batches(self, g: torch.Generator) -> list[list[int]]:
        out = []
        for _ in range(self.batches_per_epoch()):
            batch = []
            for c in torch.randperm(len(self.by_class), generator=g)[: self.P].tolist():
                members = self.by_class[c]
                if len(members) >= self.K:
                    pick = members[torch.randperm(len(members), generator=g)[: self.K]]
                else:
                    pick = members[torch.randint(len(members), (self.K,), generator=g)]
                batch += pick.tolist()
            # interleave so that rank r's every world-th item still covers all P classes
            batch = [batch[c * self.K + k] for k in range(self.K) for c in range(self.P)]
            out.append(batch)
        return out


@SAMPLERS.register("class_balanced")
class ClassBalancedSampler(_GlobalBatches):
    """Draws samples with probability inversely proportional to their class's frequency, with
    replacement, one epoch = as many samples as the dataset holds."""

    def __init__(
        self, labels: torch.Tensor, batch_size: int, seed: int, rank: int, world_size: int
    ):
        super().__init__(len(labels), batch_size, seed, rank, world_size)
        counts = torch.bincount(labels)
        self.weights = (1.0 / counts.clamp(min=1).double())[labels]

    def global_batches(self, g: torch.Generator) -> list[list[int]]:
        n = self.batches_per_epoch() * self.batch_size * self.world
        draw = torch.multinomial(self.weights, n, replacement=True, generator=g).tolist()
        size = self.batch_size * self.world
        return [draw[i : i + size] for i in range(0, n, size)]


@SAMPLERS.register("length_grouped")
class LengthGroupedSampler(_GlobalBatches):
    """Batches of similar lengths (less padding): each epoch's shuffled order is cut into mega
    batches of ``group`` global batches, each sorted by length; batch order is shuffled again."""

    def __init__(
        self,
        lengths: list[int],
        batch_size: int,
        seed: int,
        rank: int,
        world_size: int,
        group: Annotated[
            int, Field(ge=1, description="batches per mega-batch sorted by length")
        ] = 50,
    ):
        super().__init__(len(lengths), batch_size, seed, rank, world_size)
        self.lengths, self.group = torch.tensor(lengths), group

    def global_batches(self, g: torch.Generator) -> list[list[int]]:
        size = self.batch_size * self.world
        order = torch.randperm(len(self.lengths), generator=g)[: self.batches_per_epoch() * size]
        mega = size * self.group
        batches = []
        for i in range(0, len(order), mega):
            part = order[i : i + mega]
            chunk = part[self.lengths[part].argsort(descending=True, stable=True)].tolist()
            batches += [chunk[j : j + size] for j in range(0, len(chunk), size)]
        return [batches[i] for i in torch.randperm(len(batches), generator=g).tolist()]
