"""Hugging Face ``datasets`` from local storage, in any text format the platform trains.

``path`` is a ``save_to_disk`` folder (read with ``load_from_disk``; a ``DatasetDict`` gives its
splits by name) or data files (a file, a glob, or a folder of them: json/jsonl, parquet, csv,
text, arrow), read with ``load_dataset(<builder>, data_files=...)`` into Arrow files under the
platform's cache. Nothing is downloaded: a name that is not on this machine is a one-line error.

``columns`` maps the format's fields to the dataset's columns (``{text: content}``). The ``text``
format is tokenized into a token store (:mod:`src.data.token_store`), keyed by the dataset's
files (path, size, mtime), the split, the column and the tokenizer, so a second run reads the
memory map; the example formats (alpaca, messages, labelled, preference, pairs, prompts) build
the same examples as their JSONL datasets. ``image_label`` reads an image column (the ``Image``
feature, or file paths) and a label column (a ``ClassLabel``, or ints or names) as
``image_folder`` does, decoding each image when it is read.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any, Literal, Optional

import numpy as np
from pydantic import Field

from src.core.dataset_info import DataModule, DatasetInfo
from src.core.errors import ConfigError, DataError, library_message
from src.core.registry import DATASETS
from src.data import token_store
from src.data.examples import MaxLength, ValFraction
from src.data.image_folder import DecodeCache, ImageChannels, ImageSize
from src.data.image_transforms import Augment, ImageTransforms, NormalizeOption
from src.data.jsonl import (
    Rows,
    Split,
    instruction_examples,
    labelled_examples,
    pair_examples,
    preference_examples,
    prompt_examples,
    prompt_rows,
    split_rows,
)
from src.data.text import (
    CHUNK_CHARS,
    blocks_of,
    cached_tokenizer,
    encode_documents,
    load_tokenizer,
    store_fact,
    token_info,
    train_bpe,
)

BUILDERS = {
    ".json": "json",
    ".jsonl": "json",
    ".parquet": "parquet",
    ".csv": "csv",
    ".txt": "text",
    ".arrow": "arrow",
}
FIELDS = {  # the fields each format reads (columns maps them to the dataset's)
    "text": ("text",),
    "alpaca": ("instruction", "input", "output"),
    "messages": ("messages",),
    "labelled": ("text", "label"),
    "preference": ("prompt", "chosen", "rejected"),
    "pairs": ("source", "target"),
    "prompts": ("prompt", "answer"),
    "image_label": ("image", "label"),
}
OPTIONAL = {"input", "answer"}
Format = Literal[
    "text", "alpaca", "messages", "labelled", "preference", "pairs", "prompts", "image_label"
]


def _datasets():
    # nothing is fetched at run time: set before datasets reads its configuration
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import datasets

    datasets.disable_progress_bars()
    return datasets


def _data_files(path: str, builder: Optional[str]) -> tuple[list[Path], str]:
    """The data files ``path`` names and the builder that reads them."""
    p = Path(path).expanduser()
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.is_file() and (f.suffix in BUILDERS or builder))
    elif p.is_file():
        files = [p]
    else:
        files = [Path(f) for f in sorted(glob.glob(str(p), recursive=True)) if Path(f).is_file()]
    if not files and p.is_dir():
        raise ConfigError(
            f"data.path: {path}: a folder with no data files ({', '.join(BUILDERS)}) and no "
            "save_to_disk dataset"
        )
    if not files:
        raise ConfigError(
            f"data.path: {path}: no such folder or file on this machine (a dataset on the Hugging "
            "Face Hub is not downloaded at run time: download it first, e.g. "
            "datasets.load_dataset(NAME).save_to_disk(FOLDER), and give that folder)"
        )
    if builder is None:
        kinds = {BUILDERS.get(f.suffix) for f in files}
        if len(kinds) != 1 or None in kinds:
            names = ", ".join(sorted({f.suffix or f.name for f in files}))[:200]
            raise ConfigError(
                f"data.path: {path}: files of kinds {names}; give data.builder "
                f"(one of {', '.join(sorted(set(BUILDERS.values())))}) or files of one kind"
            )
        builder = kinds.pop()
    assert builder is not None
    return files, builder


def _saved(path: Path) -> bool:
    return any((path / f).is_file() for f in ("dataset_dict.json", "state.json"))


def load_splits(
    path: str,
    split: str,
    val_split: Optional[str],
    builder: Optional[str],
    cache: Path,
) -> tuple[Any, Optional[Any], list[Path]]:
    """(train, val or None, the files they were read from) of a local dataset."""
    ds_lib = _datasets()
    p = Path(path).expanduser()
    try:
        if p.is_dir() and _saved(p):
            loaded = ds_lib.load_from_disk(str(p))
            files = sorted(f for f in p.rglob("*") if f.is_file())
            if isinstance(loaded, ds_lib.DatasetDict):
                for name in (split, val_split):
                    if name is not None and name not in loaded:
                        raise ConfigError(
                            f"data.{'split' if name == split else 'val_split'}: {path} has no "
                            f"split '{name}' (it has: {', '.join(loaded)})"
                        )
                return loaded[split], loaded[val_split] if val_split else None, files
            if val_split:
                raise ConfigError(
                    f"data.val_split: {path} is one dataset, not a dict of splits; use "
                    "data.val_fraction"
                )
            return loaded, None, files
        if val_split:
            raise ConfigError(
                "data.val_split: data files have one split; use data.val_fraction (or save a "
                "DatasetDict with save_to_disk)"
            )
        files, builder = _data_files(path, builder)
        train = ds_lib.load_dataset(
            builder,
            data_files=[str(f) for f in files],
            split="train",
            cache_dir=str(cache / "hf"),
        )
        return train, None, files
    except ConfigError:
        raise
    except Exception as exc:  # datasets' own errors: one line naming the dataset
        line = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:240]
        raise DataError(f"data.path: {path}: {type(exc).__name__}: {line}") from None


def _columns(ds, fmt: str, columns: dict[str, str], path: str):
    """``ds`` with its columns renamed to the format's fields; a missing one is one line."""
    unknown = set(columns) - set(FIELDS[fmt])
    if unknown:
        raise ConfigError(
            f"data.columns: format '{fmt}' has no field {', '.join(sorted(unknown))} "
            f"(its fields: {', '.join(FIELDS[fmt])})"
        )
    have = set(ds.column_names)
    rename = {}
    for field in FIELDS[fmt]:
        col = columns.get(field, field)
        if col not in have:
            if field in OPTIONAL and field not in columns:
                continue
            how = f"data.columns.{field}: " if field in columns else "data.columns: "
            raise ConfigError(
                f"{how}{path} has no column '{col}' for the {fmt} format's '{field}' "
                f"(its columns: {', '.join(ds.column_names)})"
            )
        if col != field:
            rename[col] = field
    keep = [columns.get(f, f) for f in FIELDS[fmt] if columns.get(f, f) in have]
    ds = ds.select_columns(keep)
    return ds.rename_columns(rename) if rename else ds


TEXT_FIELDS = {"text", "instruction", "input", "output", "prompt", "chosen", "rejected",
               "source", "target", "answer"}  # fmt: skip


def _rows(ds, where: str) -> Rows:
    """The rows as dicts; a number in a text field (a CSV column read as numbers) is its text,
    an empty one (null) is an error naming the row (an empty ``input`` is no input)."""
    out = []
    for i, row in enumerate(ds.to_list()):
        here = f"{where} row {i}"
        for k, v in row.items():
            if k not in TEXT_FIELDS or isinstance(v, str):
                continue
            if v is None and k == "input":
                row[k] = ""
            elif isinstance(v, (int, float)) and not isinstance(v, bool):
                row[k] = str(v)
            else:
                raise ConfigError(f"{here}: '{k}' is {'empty' if v is None else repr(v)[:60]}")
        out.append((here, row))
    return out


def _text_store(tok, ds, source: dict, root: Path, what: str):
    """The ``text`` column of ``ds`` tokenized into the token store ``source`` names."""
    key = token_store.store_key(kind="hf_text", **source, tokenizer=token_store.tokenizer_hash(tok))
    manifest: dict = {"format": "hf_text", "rows": len(ds), "text_bytes": 0}

    def chunks() -> Iterator[list[np.ndarray]]:
        batch: list[str] = []
        size = 0
        for rows in ds.iter(batch_size=1000):
            for t in rows["text"]:
                if t:
                    batch.append(t)
                    size += len(t)
            if size >= CHUNK_CHARS:
                yield _encoded(batch)
                batch, size = [], 0
        if batch:
            yield _encoded(batch)

    def _encoded(batch: list[str]) -> list[np.ndarray]:
        manifest["text_bytes"] += sum(len(t.encode("utf-8")) for t in batch)
        return encode_documents(tok, batch)

    return token_store.open_or_build(root, key, len(tok), chunks(), manifest, what)


@DATASETS.register("hf_dataset")
def hf_dataset(
    seed: int,
    path: Annotated[
        str,
        Field(description="a save_to_disk folder, or data files (a file, glob or folder)"),
    ],
    format: Annotated[
        Format,
        Field(
            description="text (token blocks), alpaca, messages, labelled, preference, pairs, "
            "prompts, image_label"
        ),
    ] = "text",
    columns: Annotated[
        dict[str, str], Field(description="the format's field -> the dataset's column")
    ] = {},
    tokenizer: Annotated[
        Optional[str],
        Field(description="local tokenizer folder (pkg:... too); text: else a BPE of vocab_size"),
    ] = None,
    builder: Annotated[
        Optional[str],
        Field(description="datasets builder of the data files (default: from their extension)"),
    ] = None,
    split: Annotated[str, Field(description="training split of a saved DatasetDict")] = "train",
    val_split: Annotated[
        Optional[str], Field(description="validation split of a saved DatasetDict")
    ] = None,
    val_fraction: ValFraction = 0.1,
    block_size: Annotated[int, Field(ge=8, description="text: tokens per training example")] = 256,
    vocab_size: Annotated[
        int, Field(ge=300, description="text: size of the BPE trained when no tokenizer is given")
    ] = 4096,
    max_length: MaxLength = 512,
    mask_prompt: Annotated[
        bool, Field(description="alpaca/messages: leave the prompt out of the loss")
    ] = True,
    packing: Annotated[
        bool, Field(description="alpaca/messages: pack examples into blocks of max_length")
    ] = False,
    image_size: ImageSize = 32,
    channels: ImageChannels = 3,
    augment: Augment = None,
    normalize: NormalizeOption = None,
    decode_cache: DecodeCache = False,
    cache_dir: Annotated[
        Optional[str],
        Field(description="token stores, tokenizers and Arrow files (default $TESSERA_CACHE)"),
    ] = None,
    run_dir: Optional[Path] = None,
) -> DataModule:
    """A Hugging Face dataset on this machine, in any format the platform trains."""
    root = token_store.cache_root(cache_dir)
    train, val, files = load_splits(path, split, val_split, builder, root)
    train = _columns(train, format, columns, path)
    if val is not None:
        val = _columns(val, format, columns, path)
    if len(train) == 0:
        raise ConfigError(f"data.path: {path}: split '{split}' has no rows")
    facts = token_store.file_facts(files, "data.path")
    if format == "text":
        return _text(seed, train, val, facts, path, split, val_split, val_fraction, tokenizer,
                     vocab_size, block_size, root, run_dir)  # fmt: skip
    if format == "image_label":
        transforms = ImageTransforms(image_size, channels, augment, normalize)
        identity = [facts, split, val_split] if decode_cache else None
        return _images(seed, train, val, val_fraction, transforms, f"{path} [{split}]",
                       f"{path} [{val_split}]", identity, root)  # fmt: skip
    if packing and format not in ("alpaca", "messages"):
        raise ConfigError(f"data.packing: packs alpaca and messages examples, not {format}")
    if tokenizer is None:
        raise ConfigError(f"data.tokenizer: the {format} format needs a tokenizer folder")
    tok = load_tokenizer(tokenizer)
    rows = _rows(train, f"{path} [{split}]")
    if val is not None:
        val_rows = _rows(val, f"{path} [{val_split}]")
        sp: Split = (list(range(len(rows))), list(range(len(rows), len(rows) + len(val_rows))))
        rows = rows + val_rows
    else:
        sp = split_rows(len(rows), val_fraction, seed)
    what = f"{path} [{split}]"
    if format in ("alpaca", "messages"):
        return instruction_examples(
            rows, sp, tok, format, max_length, mask_prompt, packing, root, what
        )
    if format == "labelled":
        return labelled_examples(rows, sp, tok, max_length, root, what)
    if format == "preference":
        return preference_examples(rows, sp, tok, max_length, root, what)
    if format == "pairs":
        return pair_examples(rows, sp, tok, max_length, root, what)
    texts, answers = prompt_rows(rows)
    return prompt_examples(texts, answers, sp, tok, max_length, root, what)


def _text(seed, train, val, facts, path, split, val_split, val_fraction, tokenizer, vocab_size,
          block_size, root, run_dir) -> DataModule:  # fmt: skip
    """Token blocks of the text column: rows split with the seed unless a val split is named."""
    source = {"files": facts, "split": split}
    train_source, val_source = dict(source), None
    if val is not None:
        val_source = {"files": facts, "split": val_split}
    elif val_fraction:
        tr, va = split_rows(len(train), val_fraction, seed)
        if not va:
            raise ConfigError(f"data.val_fraction: {val_fraction} of {len(train)} rows is none")
        val = train.select(va)
        train = train.select(tr)
        train_source = {**source, "part": ["train", val_fraction, seed]}
        val_source = {**source, "part": ["val", val_fraction, seed]}
    if tokenizer:
        tok = load_tokenizer(tokenizer)
    elif run_dir is not None and (Path(run_dir) / "tokenizer" / "tokenizer.json").is_file():
        tok = load_tokenizer(str(Path(run_dir) / "tokenizer"))  # a resume: the run's own
    else:

        def documents():
            for rows in train.iter(batch_size=1000):
                yield from (t for t in rows["text"] if t)

        tok = cached_tokenizer(
            {"hf": train_source},
            lambda: train_bpe(documents(), len(train), vocab_size),
            vocab_size,
            root,
        )
    store, seconds = _text_store(tok, train, train_source, root, f"token store of {path} (train)")
    extra = token_info(tok)
    extra["token_stores"] = [store_fact(store, seconds)]
    val_blocks = None
    if val is not None and val_source is not None:
        vstore, vseconds = _text_store(tok, val, val_source, root, f"token store of {path} (val)")
        val_blocks = blocks_of(vstore, block_size)
        extra["val_bytes_per_token"] = vstore.manifest["text_bytes"] / max(1, len(vstore))
        extra["token_stores"].append(store_fact(vstore, vseconds))
    blocks = blocks_of(store, block_size)
    info = DatasetInfo(num_samples=len(blocks), input_shape=(block_size,), extra=extra)
    return DataModule(blocks, val_blocks, info)


class HFImages:
    """The images of a dataset's rows, decoded by ``datasets`` when read (Arrow is memory-mapped:
    nothing is held in memory): the image source of :class:`LabelledImages`."""

    decoded = False

    def __init__(self, ds, where: str):
        self.ds, self.where_name = ds, where

    def __len__(self) -> int:
        return len(self.ds)

    def image(self, row: int):
        try:
            return self.ds[row]["image"]
        except Exception as exc:  # PIL and datasets raise many types for a broken image
            raise OSError(library_message(exc, 80)) from None

    def where(self, row: int) -> str:
        return f"{self.where_name} row {row}"


class _Both:
    """Two image sources as one (a dataset's train rows, then its val rows)."""

    decoded = False

    def __init__(self, a, b):
        self.a, self.b = a, b

    def __len__(self) -> int:
        return len(self.a) + len(self.b)

    def image(self, i: int):
        return self.a.image(i) if i < len(self.a) else self.b.image(i - len(self.a))

    def where(self, i: int) -> str:
        return self.a.where(i) if i < len(self.a) else self.b.where(i - len(self.a))


def _images(seed, train, val, val_fraction, transforms, where, val_where, identity, root):
    """Images and their classes: a ClassLabel's names, else the sorted distinct labels."""
    from src.data.image_files import LabelledImages, labelled_module

    ds_lib = _datasets()
    parts = [train] if val is None else [train, val]
    for i, ds in enumerate(parts):
        if not isinstance(ds.features["image"], ds_lib.Image):  # file paths, or bytes
            parts[i] = ds.cast_column("image", ds_lib.Image())
    feature = parts[0].features["label"]
    raw = [list(ds["label"]) for ds in parts]
    if isinstance(feature, ds_lib.ClassLabel):
        names = list(feature.names)
        labels = [[int(v) for v in r] for r in raw]
    else:
        if any(v is None for r in raw for v in r):
            raise ConfigError(f"data.columns.label: {where}: a row has no label")
        names = sorted({str(v) for r in raw for v in r})
        index = {n: k for k, n in enumerate(names)}
        labels = [[index[str(v)] for v in r] for r in raw]
    source: Any = HFImages(parts[0], where)
    if val is None:
        tr, va = split_rows(len(train), val_fraction, seed)
    else:
        source = _Both(source, HFImages(parts[1], val_where))
        tr, va = list(range(len(train))), list(range(len(train), len(train) + len(val)))
    if identity is not None:
        from src.data.decoded import decoded

        source = decoded(source, identity, transforms.size, transforms.channels, root)
    flat = [v for r in labels for v in r]
    train_set = LabelledImages(source, tr, [flat[k] for k in tr], transforms, True)
    val_set = LabelledImages(source, va, [flat[k] for k in va], transforms, False)
    shape = (transforms.channels, transforms.size, transforms.size)
    return labelled_module(train_set, val_set, names, shape)
