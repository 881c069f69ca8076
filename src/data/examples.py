"""Tokenised examples of different lengths and the collators that pad them into batches, shared by
the JSONL formats and the docstrings corpus."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Annotated, Any, Optional

import torch
from pydantic import Field

# Parameters the JSONL and docstring datasets share.
Tokenizer = Annotated[str, Field(description="tokenizer: a local folder or pkg:<package>/<folder>")]
MaxLength = Annotated[
    int, Field(ge=8, description="longest example in tokens; longer ones are cut")
]
ValFraction = Annotated[
    float, Field(ge=0, lt=1, description="fraction of the samples held out for validation")
]


def lengths_of(items: Sequence[dict[str, Any]]) -> list[int]:
    """Each example's token count: a store-backed sequence knows them without reading any
    example (``lengths``); a list of examples is measured."""
    known = getattr(items, "lengths", None)
    if known is not None:
        return list(known)
    return [len(x["input_ids"]) if "input_ids" in x else len(x["chosen_input_ids"]) for x in items]


class Examples(torch.utils.data.Dataset):
    """Pre-tokenised examples of different lengths (``lengths`` for length-grouped batches)."""

    collate_fn: Optional[Callable[[list[dict[str, Any]]], dict[str, Any]]] = None  # the padding

    def __init__(self, items: Sequence[dict[str, Any]], labels: Optional[list[int]] = None):
        self.items = items  # a list, or a sequence read from a store (its own ``lengths``)
        self.lengths = lengths_of(items)
        if labels is not None:
            self.labels = torch.tensor(labels)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return self.items[i]


class PadCollator:
    """Pads every ``*input_ids`` with the pad id (and builds its ``*attention_mask``), every
    ``*labels`` sequence with -100; stacks everything else."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, rows: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for key in rows[0]:
            values = [r[key] for r in rows]
            if values[0].ndim == 0:
                out[key] = torch.stack(values)
                continue
            fill = self.pad_id if key.endswith("input_ids") else -100
            out[key] = torch.nn.utils.rnn.pad_sequence(values, batch_first=True, padding_value=fill)
            if key.endswith("input_ids"):
                mask = [torch.ones(len(v), dtype=torch.long) for v in values]
                out[key.replace("input_ids", "attention_mask")] = torch.nn.utils.rnn.pad_sequence(
                    mask, batch_first=True, padding_value=0
                )
        return out


class LeftPadCollator:
    """Left-pads prompt ids (generation continues from the right end); any other field (an
    ``answer`` string, say) is passed on as a list."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        longest = max(len(r["input_ids"]) for r in rows)
        ids = torch.full((len(rows), longest), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), longest), dtype=torch.long)
        for i, r in enumerate(rows):
            n = len(r["input_ids"])
            ids[i, longest - n :] = r["input_ids"]
            mask[i, longest - n :] = 1
        others = {k: [r[k] for r in rows] for k in rows[0] if k != "input_ids"}
        return {"input_ids": ids, "attention_mask": mask, **others}


def pack(items: Sequence[dict[str, torch.Tensor]], block_size: int, pad_id: int) -> list[dict]:
    """Examples (``input_ids``, ``labels``) packed whole into blocks of ``block_size`` tokens,
    first fit in decreasing length (an example longer than a block is cut to it). Each block
    holds ``position_ids`` that restart at every example and ``segments`` (which example each
    token is of): :class:`PackCollator` turns them into attention kept inside each example. The
    first label of each example is -100 (nothing predicts it: the token before it is another
    example's), padding is labelled -100 and joins the block's last example, after all of its
    tokens (which, causal, never see it)."""
    lengths = lengths_of(items)
    order = sorted(range(len(items)), key=lambda i: -min(lengths[i], block_size))
    blocks: list[list[int]] = []
    room: list[int] = []
    for i in order:
        n = min(lengths[i], block_size)
        b = next((j for j, r in enumerate(room) if r >= n), None)
        if b is None:
            blocks.append([])
            room.append(block_size)
            b = len(blocks) - 1
        blocks[b].append(i)
        room[b] -= n
    out = []
    for members in blocks:
        ids, labels, pos, seg = [], [], [], []
        for s, i in enumerate(members):
            item = items[i]
            x = item["input_ids"][:block_size]
            y = item["labels"][:block_size].clone()
            y[0] = -100
            ids.append(x)
            labels.append(y)
            pos.append(torch.arange(len(x)))
            seg.append(torch.full((len(x),), s))
        pad = block_size - sum(len(x) for x in ids)
        if pad:
            ids.append(torch.full((pad,), pad_id))
            labels.append(torch.full((pad,), -100))
            pos.append(torch.arange(len(pos[-1]), len(pos[-1]) + pad))
            seg.append(torch.full((pad,), len(members) - 1))
        out.append(
            {
                "input_ids": torch.cat(ids),
                "labels": torch.cat(labels),
                "position_ids": torch.cat(pos),
                "segments": torch.cat(seg),
                "num_tokens": torch.tensor(block_size - pad),
            }
        )
    return out


class PackCollator:
    """Stacks packed blocks (:func:`pack`); the attention mask is block-diagonal and causal,
    (batch, 1, block, block) booleans, which transformers' models take for a 2D one, so no
    token attends to another example's; ``num_tokens`` counts the real tokens of the batch."""

    def __call__(self, rows: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        seg = torch.stack([r["segments"] for r in rows])
        n = seg.shape[1]
        causal = torch.ones(n, n, dtype=torch.bool).tril()
        return {
            "input_ids": torch.stack([r["input_ids"] for r in rows]),
            "labels": torch.stack([r["labels"] for r in rows]),
            "position_ids": torch.stack([r["position_ids"] for r in rows]),
            "attention_mask": ((seg[:, :, None] == seg[:, None, :]) & causal)[:, None],
            "num_tokens": torch.stack([r["num_tokens"] for r in rows]).sum(),
        }
