"""Tokenized examples kept in a token store (:mod:`src.data.token_store`), so a second run on the
same data does not tokenize it again.

An example is encoded once into a fixed number of *parts* (token id arrays: a prompt and its
answer, or a prompt, a chosen and a rejected answer), stored as consecutive documents of one
store. What depends on a run's options but not on the tokenizer (the cut to ``max_length``, the
prompt's mask, the EOS after an answer) is applied when an example is read, so runs that differ in
those share a store.

The store's key is a hash of the examples' content itself (the strings to tokenize, in order),
the tokenizer (:func:`~src.data.token_store.tokenizer_hash`, plus its chat template), how parts
are made (``kind`` and its options) and the store format: any edit to the data, wherever it came
from (a JSONL file, a Hugging Face dataset, the standard library), builds a new store.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from src.core.dataset_info import DataModule, DatasetInfo
from src.data import token_store
from src.data.examples import Examples, PadCollator
from src.data.text import store_fact, token_info
from src.data.token_store import TokenStore, cache_root

Split = tuple[list[int], list[int]]  # (train, val) indices into the examples

CHUNK = 1024  # examples tokenized per batched call

# kind -> how many parts one example is stored as
PARTS = {"pair": 2, "preference": 3, "source_target": 2, "single": 1, "prompt": 1}


def content_hash(texts: Sequence[Any]) -> str:
    """A hash of the examples' content, in order (each unit JSON-encoded on its own line)."""
    h = hashlib.sha256()
    for t in texts:
        h.update(json.dumps(t, ensure_ascii=False, default=str).encode())
        h.update(b"\n")
    return h.hexdigest()[:20]


def build_parts(
    texts: Sequence[Any],
    encode: Callable[[Sequence[Any]], list[list[list[int]]]],
    kind: str,
    options: dict,
    tok,
    root: Path,
    what: str,
) -> tuple[TokenStore, Optional[float]]:
    """The store of ``texts`` encoded by ``encode`` (a batch of units -> each unit's parts),
    opened when it exists, else built. Returns it and its build seconds (None: it was there)."""
    k = PARTS[kind]
    key = token_store.store_key(
        kind=f"examples:{kind}",
        options=options,
        content=content_hash(texts),
        examples=len(texts),
        tokenizer=token_store.tokenizer_hash(tok),
        chat_template=getattr(tok, "chat_template", None),
    )

    def chunks() -> Iterator[list[np.ndarray]]:
        for lo in range(0, len(texts), CHUNK):
            docs = []
            for parts in encode(texts[lo : lo + CHUNK]):
                assert len(parts) == k
                docs += [np.asarray(p, dtype=np.int64) for p in parts]
            yield docs

    manifest = {"kind": kind, "parts": k, "examples": len(texts), "options": options}
    return token_store.open_or_build(root, key, len(tok), chunks(), manifest, what)


class StoredItems(Sequence):
    """Examples ``indices`` of a store of parts, each assembled into tensors when read.

    ``kind``: ``pair`` (input_ids = prompt + answer cut to ``max_length``, labels -100 over the
    prompt when ``mask_prompt``), ``preference`` (that, for the chosen and the rejected answer),
    ``source_target`` (source and target each cut to ``max_length - 1`` and ended with ``eos``),
    ``single`` (input_ids and the example's class in ``labels``), ``prompt`` (the last
    ``max_length`` ids, and the example's ``answer`` string when there are answers)."""

    def __init__(
        self,
        store: TokenStore,
        kind: str,
        indices: Sequence[int],
        max_length: int,
        mask_prompt: bool = True,
        eos: int = 0,
        extra: Optional[Sequence[Any]] = None,
    ):
        self.store, self.kind, self.k = store, kind, PARTS[kind]
        self.indices = np.asarray(indices, dtype=np.int64)
        self.max_length, self.mask_prompt, self.eos = max_length, mask_prompt, eos
        self.extra = list(extra) if extra is not None else None  # per example: class or answer
        ends = np.asarray(store.doc_ends)
        starts = np.concatenate([[0], ends[:-1]]) if len(ends) else ends
        first = self.indices * self.k
        self._starts = starts[first[:, None] + np.arange(self.k)]  # (n, k)
        self._lens = ends[first[:, None] + np.arange(self.k)] - self._starts
        L = max_length
        if kind in ("pair", "preference"):
            self.lengths = np.minimum(self._lens[:, 0] + self._lens[:, 1], L).tolist()
        elif kind == "source_target":
            self.lengths = (np.minimum(self._lens[:, 0], L - 1) + 1).tolist()
        elif kind == "prompt":
            self.lengths = np.minimum(self._lens[:, 0], L).tolist()
        else:
            self.lengths = self._lens[:, 0].tolist()

    def __len__(self) -> int:
        return len(self.indices)

    def _part(self, i: int, j: int) -> np.ndarray:
        return np.asarray(self.store.read(int(self._starts[i, j]), int(self._lens[i, j])))

    def _pair(self, prompt: np.ndarray, answer: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        ids = np.concatenate([prompt, answer]).astype(np.int64)[: self.max_length]
        labels = ids.copy()
        if self.mask_prompt:
            labels[: len(prompt)] = -100
        return torch.from_numpy(ids), torch.from_numpy(labels)

    def _ended(self, part: np.ndarray) -> torch.Tensor:
        out = np.empty(min(len(part), self.max_length - 1) + 1, dtype=np.int64)
        out[:-1] = part[: len(out) - 1]
        out[-1] = self.eos
        return torch.from_numpy(out)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        parts = [self._part(i, j) for j in range(self.k)]
        if self.kind == "pair":
            ids, labels = self._pair(parts[0], parts[1])
            return {"input_ids": ids, "labels": labels}
        if self.kind == "preference":
            c_ids, c_labels = self._pair(parts[0], parts[1])
            r_ids, r_labels = self._pair(parts[0], parts[2])
            return {
                "chosen_input_ids": c_ids,
                "chosen_labels": c_labels,
                "rejected_input_ids": r_ids,
                "rejected_labels": r_labels,
            }
        if self.kind == "source_target":
            return {"input_ids": self._ended(parts[0]), "labels": self._ended(parts[1])}
        if self.kind == "prompt":
            item: dict[str, Any] = {
                "input_ids": torch.from_numpy(parts[0][-self.max_length :].astype(np.int64))
            }
            if self.extra is not None:
                item["answer"] = self.extra[i]
            return item
        assert self.extra is not None
        return {
            "input_ids": torch.from_numpy(parts[0].astype(np.int64)),
            "labels": torch.tensor(self.extra[i]),
        }


def examples_module(
    train_items, val_items, tok, labels=None, extra_info=None, collate=None
) -> DataModule:
    train = Examples(train_items, None if labels is None else labels[0])
    val = Examples(val_items, None if labels is None else labels[1]) if len(val_items) else None
    collate = collate or PadCollator(tok.pad_token_id)
    train.collate_fn = collate
    if val is not None:
        val.collate_fn = collate
    extra = {**token_info(tok), **(extra_info or {})}
    longest = max(train.lengths)
    return DataModule(
        train, val, DatasetInfo(num_samples=len(train), input_shape=(longest,), extra=extra)
    )


def stored_split(
    texts: list,
    encode,
    kind: str,
    options: dict,
    tok,
    split: Split,
    root: Optional[Path],
    what: str,
    **read: Any,
) -> tuple[StoredItems, StoredItems, dict]:
    """``texts`` tokenized once into a token store (:mod:`src.data.example_store`); the train
    and validation examples read from it, and what a run reports of the store."""
    store, seconds = build_parts(
        texts, encode, kind, options, tok, root or cache_root(), f"token store of {what}"
    )
    extra = read.pop("extra", None)
    tr, va = split
    pick = (lambda idx: [extra[i] for i in idx]) if extra is not None else (lambda idx: None)
    train = StoredItems(store, kind, tr, extra=pick(tr), **read)
    val = StoredItems(store, kind, va, extra=pick(va), **read)
    return train, val, {"token_stores": [store_fact(store, seconds)]}


def token_ids(tok, texts: list[str], **kw: Any) -> list[list[int]]:
    return tok(list(texts), add_special_tokens=kw.pop("special", False), verbose=False, **kw)[
        "input_ids"
    ]


def class_examples(
    texts: list[str],
    labels: list[int],
    names: Sequence[str],
    split: Split,
    tok,
    max_length: int,
    root: Optional[Path],
    what: str,
) -> DataModule:
    """Texts and their class indices (``names``): ids cut to ``max_length`` the tokenizer's way
    (its special tokens kept), in a token store."""

    def encode(batch):
        return [
            [ids]
            for ids in token_ids(tok, batch, special=True, truncation=True, max_length=max_length)
        ]

    train, val, extra = stored_split(
        texts, encode, "single", {"max_length": max_length}, tok, split, root, what,
        max_length=max_length, extra=labels,
    )  # fmt: skip
    tr, va = split
    dm = examples_module(train, val, tok, ([labels[i] for i in tr], [labels[i] for i in va]), extra)
    counts = np.bincount([labels[i] for i in tr], minlength=len(names))
    dm.info = DatasetInfo(
        num_samples=dm.info.num_samples,
        num_classes=len(names),
        class_names=tuple(names),
        class_counts=tuple(int(c) for c in counts),
        input_shape=dm.info.input_shape,
        extra=dm.info.extra,
    )
    return dm
