"""JSONL data for language models: instruction and chat data with the prompt masked out of the
loss, labelled text for classification, and preference pairs for DPO. Examples have different
lengths; the padding collator pads each batch to its longest example.

Formats (one JSON object per line):
    alpaca:      {"instruction": ..., "input": ... (optional), "output": ...}
    messages:    {"messages": [{"role": "user", "content": ...}, {"role": "assistant", ...}]}
    labelled:    {"text": ..., "label": ...}
    preference:  {"prompt": ..., "chosen": ..., "rejected": ...}

Each format is built from rows by one function (``instruction_examples`` ...), which the JSONL
datasets and ``hf_dataset`` (src/data/hf.py) share.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Literal, Optional

import numpy as np
import torch
from pydantic import Field

from src.core.dataset_info import DataModule, DatasetInfo
from src.core.errors import ConfigError
from src.core.registry import DATASETS
from src.data.docstrings import function_prompts
from src.data.example_store import Split, class_examples, examples_module, stored_split, token_ids
from src.data.examples import (
    Examples,
    LeftPadCollator,
    MaxLength,
    PackCollator,
    Tokenizer,
    ValFraction,
    pack,
)
from src.data.text import load_tokenizer, token_info
from src.data.token_store import cache_root

CacheDir = Annotated[
    Optional[str],
    Field(
        description="where token stores are kept (default $TESSERA_CACHE, else ~/.cache/tessera)"
    ),
]
Packing = Annotated[
    bool,
    Field(
        description="pack examples into blocks of max_length tokens, attention kept inside "
        "each (no padding)"
    ),
]
ALPACA = "### Instruction:\n{instruction}\n\n{input_block}### Response:\n"


def read_jsonl(
    path: str, need: tuple[str, ...] = (), key: str = "data.path"
) -> list[tuple[str, dict[str, Any]]]:
    """The JSON objects of a JSONL file, each with its ``path:line`` for error messages; blank
    lines are skipped, and a line without every key of ``need`` is an error that names it."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise ConfigError(f"{key}: file not found: {path}")
    rows = []
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        line_no = p.read_bytes()[: exc.start].count(b"\n") + 1
        raise ConfigError(f"{key}: {path}:{line_no}: not UTF-8 text") from None
    except OSError as exc:
        raise ConfigError(f"{key}: {path}: cannot read ({exc.strerror or exc})") from None
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path}:{n}: invalid JSON ({exc.msg})") from None
        if not isinstance(row, dict):
            raise ConfigError(f"{path}:{n}: expected a JSON object")
        _need(row, need, f"{path}:{n}")
        rows.append((f"{path}:{n}", row))
    if not rows:
        raise ConfigError(f"{path}: no examples")
    return rows


def _need(row: dict, keys: tuple[str, ...], where: str) -> None:
    missing = [k for k in keys if k not in row]
    if missing:
        raise ConfigError(f"{where}: missing {', '.join(missing)}")


def prompt_and_answer(row: dict, fmt: str, tok, where: str) -> tuple[str, str]:
    """The text the model reads (not trained on) and the text it learns to write."""
    if fmt == "alpaca":
        _need(row, ("instruction", "output"), where)
        inp = row.get("input") or ""
        block = f"### Input:\n{inp}\n\n" if inp else ""
        return ALPACA.format(instruction=row["instruction"], input_block=block), row["output"]
    _need(row, ("messages",), where)
    msgs = row["messages"]
    if not msgs or msgs[-1].get("role") != "assistant":
        raise ConfigError(f"{where}: the last message must be the assistant's")
    prompt = tok.apply_chat_template(msgs[:-1], tokenize=False, add_generation_prompt=True)
    return prompt, msgs[-1]["content"]


def encode_pair(
    tok, prompt: str, answer: str, max_length: int, mask_prompt: bool
) -> dict[str, torch.Tensor]:
    """input_ids = prompt + answer + EOS; labels = -100 over the prompt (when masked)."""
    p = tok(prompt, add_special_tokens=False)["input_ids"]
    a = tok(answer, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    ids = (p + a)[:max_length]
    labels = ([-100] * len(p) if mask_prompt else p) + a
    return {"input_ids": torch.tensor(ids), "labels": torch.tensor(labels[:max_length])}


Rows = list[tuple[str, dict[str, Any]]]  # (where it came from, for messages; the example)


def split_rows(n: int, val_fraction: float, seed: int) -> Split:
    order = np.random.default_rng(seed).permutation(n).tolist()
    n_val = int(round(val_fraction * n))
    return sorted(order[n_val:]), sorted(order[:n_val])


def _answers_ended(tok, texts: list[str]) -> list[list[int]]:
    return [ids + [tok.eos_token_id] for ids in token_ids(tok, texts)]


def instruction_examples(
    rows: Rows,
    split: Split,
    tok,
    format: str,
    max_length: int,
    mask_prompt: bool = True,
    packing: bool = False,
    root: Optional[Path] = None,
    what: str = "instructions",
) -> DataModule:
    """alpaca or messages rows, the prompt masked out of the loss (``mask_prompt``); with
    ``packing``, each split's examples packed into blocks of ``max_length`` tokens."""
    texts = [list(prompt_and_answer(r, format, tok, where)) for where, r in rows]

    def encode(batch):
        return list(
            zip(token_ids(tok, [p for p, _ in batch]), _answers_ended(tok, [a for _, a in batch]))
        )

    train, val, extra = stored_split(
        texts, encode, "pair", {}, tok, split, root, what,
        max_length=max_length, mask_prompt=mask_prompt,
    )  # fmt: skip
    if packing:
        return packedexamples_module(train, val, tok, max_length, extra)
    return examples_module(train, val, tok, extra_info=extra)


def packedexamples_module(
    train_items, val_items, tok, block_size: int, extra_info=None
) -> DataModule:
    """Train and validation examples each packed into blocks (:func:`pack`): the same tokens
    and labels, without padding, and no example attends to another."""
    train = Examples(pack(train_items, block_size, tok.pad_token_id))
    val = Examples(pack(val_items, block_size, tok.pad_token_id)) if len(val_items) else None
    train.collate_fn = PackCollator()
    if val is not None:
        val.collate_fn = train.collate_fn
    extra = {**token_info(tok), **(extra_info or {}), "packed_examples": len(train_items)}
    return DataModule(
        train, val, DatasetInfo(num_samples=len(train), input_shape=(block_size,), extra=extra)
    )


def labelled_examples(
    rows: Rows,
    split: Split,
    tok,
    max_length: int,
    root: Optional[Path] = None,
    what: str = "labelled text",
) -> DataModule:
    """``{"text", "label"}`` rows; labels may be names or ints (classes: their sorted names)."""
    for where, r in rows:
        _need(r, ("text", "label"), where)
    names = sorted({str(r["label"]) for _, r in rows})
    index = {n: i for i, n in enumerate(names)}
    labels = [index[str(r["label"])] for _, r in rows]
    return class_examples(
        [r["text"] for _, r in rows], labels, names, split, tok, max_length, root, what
    )


def preference_examples(
    rows: Rows,
    split: Split,
    tok,
    max_length: int,
    root: Optional[Path] = None,
    what: str = "preference pairs",
) -> DataModule:
    """``{"prompt", "chosen", "rejected"}`` rows; prompts are masked out of the labels."""
    for where, r in rows:
        _need(r, ("prompt", "chosen", "rejected"), where)
    texts = [[r["prompt"], r["chosen"], r["rejected"]] for _, r in rows]

    def encode(batch):
        cols = list(zip(*batch))
        p, c, j = (
            token_ids(tok, cols[0]),
            _answers_ended(tok, cols[1]),
            _answers_ended(tok, cols[2]),
        )
        return list(zip(p, c, j))

    train, val, extra = stored_split(
        texts, encode, "preference", {}, tok, split, root, what, max_length=max_length
    )
    return examples_module(train, val, tok, extra_info=extra)


def pair_examples(
    rows: Rows,
    split: Split,
    tok,
    max_length: int,
    root: Optional[Path] = None,
    what: str = "pairs",
) -> DataModule:
    """``{"source", "target"}`` rows for sequence-to-sequence models."""
    for where, r in rows:
        _need(r, ("source", "target"), where)
    texts = [[r["source"], r["target"]] for _, r in rows]

    def encode(batch):
        return list(
            zip(token_ids(tok, [s for s, _ in batch]), token_ids(tok, [t for _, t in batch]))
        )

    train, val, extra = stored_split(
        texts, encode, "source_target", {}, tok, split, root, what,
        max_length=max_length, eos=tok.eos_token_id,
    )  # fmt: skip
    return examples_module(train, val, tok, extra_info=extra)


def prompt_examples(
    texts: list[str],
    answers: Optional[list[str]],
    split: Split,
    tok,
    max_length: int,
    root: Optional[Path] = None,
    what: str = "prompts",
) -> DataModule:
    """Prompts (their last ``max_length`` tokens), left-padded for generation; ``answers`` go
    with them for rewards that check answers."""

    def encode(batch):
        return [[ids] for ids in token_ids(tok, batch)]

    train, val, extra = stored_split(
        texts, encode, "prompt", {}, tok, split, root, what, max_length=max_length, extra=answers
    )
    return examples_module(
        train, val, tok, extra_info=extra, collate=LeftPadCollator(tok.pad_token_id)
    )


def prompt_rows(rows: Rows) -> tuple[list[str], Optional[list[str]]]:
    """The prompts of ``{"prompt"}`` rows, and their answers where any row has one."""
    for where, r in rows:
        _need(r, ("prompt",), where)
    texts = [r["prompt"] for _, r in rows]
    answers = None
    if any("answer" in r for _, r in rows):  # for rewards that check answers (exact_answer)
        answers = [str(r.get("answer", "")) for _, r in rows]
    return texts, answers


@DATASETS.register("instructions")
def instructions(
    seed: int,
    path: Annotated[
        str, Field(description="JSONL file. tokenizer: local tokenizer folder (pkg:... too)")
    ],
    tokenizer: Tokenizer,
    format: Annotated[
        Literal["alpaca", "messages"],
        Field(description="alpaca or messages (rendered with the tokenizer's chat template)"),
    ] = "alpaca",
    max_length: MaxLength = 512,
    mask_prompt: Annotated[
        bool, Field(description="leave the prompt out of the loss (only the answer is learned)")
    ] = True,
    val_fraction: ValFraction = 0.1,
    packing: Packing = False,
    cache_dir: CacheDir = None,
) -> DataModule:
    """Instruction or chat data for supervised fine-tuning; the prompt is masked out of the loss."""
    tok = load_tokenizer(tokenizer)
    rows = read_jsonl(path)
    split = split_rows(len(rows), val_fraction, seed)
    return instruction_examples(
        rows, split, tok, format, max_length, mask_prompt, packing, cache_root(cache_dir), path
    )


@DATASETS.register("labelled_text")
def labelled_text(
    seed: int,
    path: Annotated[str, Field(description='JSONL file of {"text", "label"} lines')],
    tokenizer: Tokenizer,
    max_length: MaxLength = 256,
    val_fraction: ValFraction = 0.2,
    cache_dir: CacheDir = None,
) -> DataModule:
    """``{"text", "label"}`` lines for sequence classification; labels may be names or ints."""
    rows = read_jsonl(path, need=("text", "label"))
    split = split_rows(len(rows), val_fraction, seed)
    tok = load_tokenizer(tokenizer)
    return labelled_examples(rows, split, tok, max_length, cache_root(cache_dir), path)


@DATASETS.register("preference")
def preference(
    seed: int,
    path: Annotated[str, Field(description='JSONL file of {"prompt", "chosen", "rejected"} lines')],
    tokenizer: Tokenizer,
    max_length: MaxLength = 256,
    val_fraction: ValFraction = 0.1,
    cache_dir: CacheDir = None,
) -> DataModule:
    """``{"prompt", "chosen", "rejected"}`` pairs for DPO; prompts are masked out of the labels."""
    rows = read_jsonl(path, need=("prompt", "chosen", "rejected"))
    split = split_rows(len(rows), val_fraction, seed)
    tok = load_tokenizer(tokenizer)
    return preference_examples(rows, split, tok, max_length, cache_root(cache_dir), path)


@DATASETS.register("pairs")
def pairs(
    seed: int,
    path: Annotated[str, Field(description='JSONL file of {"source", "target"} lines')],
    tokenizer: Tokenizer,
    max_length: MaxLength = 256,
    val_fraction: ValFraction = 0.1,
    cache_dir: CacheDir = None,
) -> DataModule:
    """``{"source", "target"}`` lines for sequence-to-sequence models."""
    rows = read_jsonl(path, need=("source", "target"))
    split = split_rows(len(rows), val_fraction, seed)
    tok = load_tokenizer(tokenizer)
    return pair_examples(rows, split, tok, max_length, cache_root(cache_dir), path)


@DATASETS.register("prompts")
def prompts(
    seed: int,
    tokenizer: Tokenizer,
    path: Annotated[
        Optional[str],
        Field(
            description='JSONL file of {"prompt"} lines (and "answer" for rewards that check it)'
        ),
    ] = None,
    stdlib_functions: Annotated[
        bool,
        Field(description="use standard-library function headers as prompts instead of a file"),
    ] = False,
    max_length: Annotated[
        int, Field(ge=2, description="longest prompt in tokens; longer ones keep their end")
    ] = 64,
    val_fraction: ValFraction = 0.1,
    limit: Annotated[
        Optional[Annotated[int, Field(ge=2)]], Field(description="use only the first N prompts")
    ] = None,
    cache_dir: CacheDir = None,
) -> DataModule:
    """Prompts for PPO: ``{"prompt"}`` JSONL lines, or (``stdlib_functions``) the signature and
    docstring opening of standard-library functions."""
    tok = load_tokenizer(tokenizer)
    answers = None
    if path:
        texts, answers = prompt_rows(read_jsonl(path, need=("prompt",)))
    elif stdlib_functions:
        texts = function_prompts()
    else:
        raise ConfigError("data: give 'path' (JSONL of prompts) or stdlib_functions: true")
    if limit:
        texts = texts[:limit]
        answers = answers[:limit] if answers is not None else None
    split = split_rows(len(texts), val_fraction, seed)
    what = path or "standard-library function prompts"
    return prompt_examples(texts, answers, split, tok, max_length, cache_root(cache_dir), what)
