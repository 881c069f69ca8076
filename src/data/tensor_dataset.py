"""In-memory datasets whose batches are gathered with one indexing op instead of per-sample calls."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Optional

import torch
from torch.utils.data import Dataset


class InMemoryDataset(Dataset):
    """Inputs and labels held as tensors; a batch is ``{"inputs": x[idx], "labels": y[idx]}``,
    plus ``views`` (a list of (B, ...) tensors) when a task sets ``view_transform``.

    DataLoader calls ``__getitems__`` with a whole batch of indices, so fetching a batch costs one
    tensor gather rather than ``batch_size`` Python calls plus a collate.

    Args:
        inputs: (N, ...) tensor.
        labels: (N,) tensor.
        transform: optional batched transform applied to ``inputs[idx]`` (B, ...) -> (B, ...).
    """

    batched = True  # the loader must not collate again

    def __init__(
        self,
        inputs: torch.Tensor,
        labels: torch.Tensor,
        transform: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
    ):
        assert len(inputs) == len(labels)
        self.inputs, self.labels, self.transform = inputs, labels, transform
        self.view_transform: Optional[Callable[[torch.Tensor], list[torch.Tensor]]] = None

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        batch = self.__getitems__([i])
        return {k: v[0] for k, v in batch.items()}

    def __getitems__(self, indices: list[int]) -> dict[str, torch.Tensor]:
        idx = torch.as_tensor(indices, dtype=torch.long)
        x = self.inputs[idx]
        if self.transform is not None:
            x = self.transform(x)
        batch: dict[str, Any] = {"inputs": x, "labels": self.labels[idx]}
        if self.view_transform is not None:  # per sample: each gets its own random views
            per_sample = [self.view_transform(xi) for xi in x]
            batch["views"] = [torch.stack(v) for v in zip(*per_sample)]
        return batch
