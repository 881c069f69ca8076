"""Image data in WebDataset tar shards, read by random access so the platform's epoch order,
exact resume at any world size, and loader workers work as they do for data in memory.

A shard is a plain tar whose members are grouped into samples by key, as WebDataset groups
them: ``<key>.jpg|jpeg|png|webp|...`` the image, ``<key>.cls`` its class (an integer), ``<key>.txt``
a caption, ``<key>.json`` either of them (``label``, ``caption`` or ``captions``). Shards written
by webdataset's ``TarWriter``/``ShardWriter``, by ``python -m src.main pack``, or by ``tar``, are
all read.

Each shard is indexed once (the ``wids`` idea of the webdataset project): one sequential pass
records every sample's image offset and size, its small text members, and whether its image
header is readable; the index is kept in the data cache (``<cache>/shards/<key>.json``, keyed by
the shard's path, size and mtime). A training step then reads each image with one ``pread``.
"""

from __future__ import annotations

import glob
import io
import json
import os
import tarfile
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, Literal, Optional, Union

import numpy as np
import torch
from pydantic import Field

from src.core.dataset_info import DataModule, DatasetInfo
from src.core.errors import ConfigError, DataError, library_message
from src.core.registry import DATASETS
from src.data.digits import stratified_split
from src.data.examples import ValFraction
from src.data.image_files import LabelledImages, check_image, labelled_module, open_rgb
from src.data.image_folder import BadFiles, CacheDir, DecodeCache, ImageChannels, ImageSize
from src.data.image_text import CaptionedImages, CaptionPairs, Images
from src.data.image_transforms import Augment, ImageTransforms, NormalizeOption
from src.data.token_store import store_key

INDEX_VERSION = 1
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "ppm", "bmp", "tif", "tiff")
TEXT_EXTS = ("cls", "txt", "json")
MAX_TEXT = 1 << 16  # text members larger than this are not kept in the index
MANIFEST = "manifest.json"  # what pack writes beside its shards


def split_name(name: str) -> tuple[str, str]:
    """WebDataset's member naming: the key is the path up to the first dot of the base name, the
    extension the rest (lower case)."""
    folder, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext.lower() if dot else ""


def expand(paths: Union[str, Sequence[str]], key: str = "data.paths") -> list[str]:
    """Shard files from brace patterns (``train-{000000..000099}.tar``), globs and folders (every
    ``*.tar`` in them); a named shard that does not exist is an error, never skipped."""
    from braceexpand import braceexpand

    if isinstance(paths, str):
        paths = [paths]
    out: list[str] = []
    for pattern in paths:
        for p in braceexpand(os.path.expanduser(pattern)):
            if os.path.isdir(p):
                found = sorted(glob.glob(os.path.join(p, "*.tar")))
                if not found:
                    raise ConfigError(f"{key}: {p}: no .tar shards in this folder")
                out += found
            elif any(ch in p for ch in "*?["):
                found = sorted(glob.glob(p))
                if not found:
                    raise ConfigError(f"{key}: {p}: matches no file")
                out += found
            elif not os.path.isfile(p):
                raise ConfigError(f"{key}: shard not found: {p}")
            else:
                out.append(p)
    if not out:
        raise ConfigError(f"{key}: no shards given")
    return [os.path.abspath(p) for p in out]


def _index_file(cache: Path, path: str, st: os.stat_result) -> Path:
    key = store_key(
        kind="shard-index", v=INDEX_VERSION, path=path, size=st.st_size, mt=st.st_mtime_ns
    )
    return cache / "shards" / f"{key}.json"


def index_shard(path: str, cache: Optional[Path]) -> list[dict]:
    """The samples of one shard, in order: ``{"key", "image": [ext, offset, size], "text": {ext:
    content}, "error": None or why the image is unreadable}``. Read from the data cache when the
    shard has not changed; else built with one pass over the tar (and cached)."""
    try:
        st = os.stat(path)
    except OSError as exc:
        raise ConfigError(f"data.paths: {path}: cannot read ({exc.strerror or exc})") from None
    cached = _index_file(cache, path, st) if cache is not None else None
    if cached is not None and cached.is_file():
        try:
            return json.loads(cached.read_text(encoding="utf-8"))["samples"]
        except (OSError, ValueError, KeyError, TypeError):
            pass  # damaged: built again
    samples: dict[str, dict] = {}
    try:
        with tarfile.open(path, "r:") as tf:
            for m in tf:
                if not m.isfile():
                    continue
                key, ext = split_name(m.name)
                if m.offset_data + m.size > st.st_size:
                    raise tarfile.ReadError(
                        f"member {m.name} ends at byte {m.offset_data + m.size:,}, past the "
                        f"end of the file ({st.st_size:,} bytes)"
                    )
                s = samples.setdefault(key, {"key": key, "image": None, "text": {}, "error": None})
                if ext in IMAGE_EXTS and s["image"] is None:
                    s["image"] = [ext, m.offset_data, m.size]
                    f = tf.extractfile(m)
                    assert f is not None
                    s["error"] = check_image(io.BytesIO(f.read()))
                elif ext in TEXT_EXTS and m.size <= MAX_TEXT:
                    f = tf.extractfile(m)
                    assert f is not None
                    s["text"][ext] = f.read().decode("utf-8", errors="replace")
            # a tar cut at a member boundary reads as a shorter tar: only the end-of-archive
            # marker (a zero block, which every tar writer appends) tells them apart
            with open(path, "rb") as raw:
                raw.seek(tf.offset)
                marker = raw.read(tarfile.BLOCKSIZE)
            if len(marker) < tarfile.BLOCKSIZE or marker.count(0) != tarfile.BLOCKSIZE:
                raise tarfile.ReadError(f"no end-of-archive marker after byte {tf.offset:,}")
    except (tarfile.TarError, EOFError, OSError) as exc:
        what = (
            "truncated or damaged"
            if isinstance(exc, (tarfile.ReadError, EOFError))
            else "unreadable"
        )
        raise DataError(
            f"data.paths: {path}: not a readable tar shard, {what} ({library_message(exc, 100)})"
        ) from None
    out = list(samples.values())
    if cached is not None:
        try:
            cached.parent.mkdir(parents=True, exist_ok=True)
            tmp = cached.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps({"path": path, "samples": out}), encoding="utf-8")
            os.replace(tmp, cached)
        except OSError:
            pass  # only a slower next start
    return out


def _label(s: dict, where: str) -> int:
    text = s["text"]
    try:
        if "cls" in text:
            return int(text["cls"].strip())
        if "json" in text:
            value = json.loads(text["json"]).get("label")
            if value is not None and not isinstance(value, bool):
                return int(value)
    except (ValueError, AttributeError, TypeError):
        pass
    raise DataError(
        f"{where}: no integer class label (needs <key>.cls or a <key>.json with 'label')"
    )


def _captions(s: dict, where: str) -> list[str]:
    text = s["text"]
    if "json" in text:
        try:
            meta = json.loads(text["json"])
        except ValueError:
            meta = None
        if isinstance(meta, dict):
            caps = meta.get("captions")
            if isinstance(caps, list) and caps and all(isinstance(c, str) for c in caps):
                return caps
            if isinstance(meta.get("caption"), str):
                return [meta["caption"]]
    if "txt" in text and text["txt"].strip():
        return [text["txt"].strip()]
    raise DataError(
        f"{where}: no caption (needs <key>.txt, or a <key>.json with 'caption' or 'captions')"
    )


class ShardImages:
    """Images read from tar shards by offset: ``image(i)`` is one ``pread`` and a PIL decode."""

    decoded = False

    def __init__(self, shards: list[str], locs: np.ndarray, keys: list[str], draft=None):
        self.shards, self.locs, self.keys, self.draft = shards, locs, keys, draft
        self._fds: dict[int, int] = {}

    def __len__(self) -> int:
        return len(self.locs)

    def read(self, i: int) -> bytes:
        shard, offset, size = (int(v) for v in self.locs[i])
        fd = self._fds.get(shard)
        if fd is None:
            fd = self._fds[shard] = os.open(self.shards[shard], os.O_RDONLY)
        data = os.pread(fd, size, offset)
        if len(data) != size:
            raise OSError(f"read {len(data)} of {size} bytes (the shard was truncated)")
        return data

    def image(self, i: int):
        from PIL import Image

        with Image.open(io.BytesIO(self.read(i))) as im:
            return open_rgb(im, self.draft)

    def where(self, i: int) -> str:
        return f"{self.shards[int(self.locs[i][0])]}: {self.keys[i]}"

    def __getstate__(self):  # a worker opens the shards itself
        return {"shards": self.shards, "locs": self.locs, "keys": self.keys, "draft": self.draft}

    def __setstate__(self, state):
        self.__init__(state["shards"], state["locs"], state["keys"], state["draft"])

    def __del__(self):
        for fd in getattr(self, "_fds", {}).values():
            try:
                os.close(fd)
            except OSError:
                pass


class Indexed:
    """Every sample of a list of shards: ``images`` (a :class:`ShardImages`), ``records`` (the
    index entries) and ``identity`` (what says any of them changed)."""

    def __init__(self, shards: list[str], cache: Optional[Path], bad_files: str, key: str):
        records, locs, keys, identity = [], [], [], []
        bad = []
        for n, path in enumerate(shards):
            st = os.stat(path)
            identity.append([path, st.st_size, st.st_mtime_ns])
            for s in index_shard(path, cache):
                where = f"{path}: {s['key']}"
                if s["image"] is None:
                    bad.append(f"{where}: no image member (.{', .'.join(IMAGE_EXTS[:4])}, ...)")
                    continue
                if s["error"] is not None:
                    bad.append(f"{where}: not a readable image ({s['error']})")
                    continue
                s["where"] = where
                records.append(s)
                locs.append((n, s["image"][1], s["image"][2]))
                keys.append(s["key"])
        if bad and bad_files == "error":
            more = f" ({len(bad)} bad samples in all)" if len(bad) > 1 else ""
            raise DataError(f"{bad[0]}{more}; fix the shard, or set data.bad_files=skip")
        if bad:
            warnings.warn(
                f"{key}: skipped {len(bad)} samples without a readable image (data.bad_files=skip)",
                stacklevel=2,
            )
        if not records:
            raise DataError(f"{key}: the shards hold no sample with an image")
        self.records, self.identity, self.skipped = records, identity, len(bad)
        self.images = ShardImages(shards, np.asarray(locs, dtype=np.int64).reshape(-1, 3), keys)


def _classes(shards: list[str], labels: list[int]) -> list[str]:
    """Class names from a pack manifest beside the shards, else the label numbers."""
    manifest = Path(shards[0]).parent / MANIFEST
    if manifest.is_file():
        try:
            names = json.loads(manifest.read_text(encoding="utf-8")).get("classes")
            if isinstance(names, list) and len(names) > max(labels):
                return [str(n) for n in names]
        except (OSError, ValueError, AttributeError):
            pass
    return [str(c) for c in range(max(labels) + 1)]


class SourceImages(Images):
    """The ``Images`` the caption datasets take (``len``, ``take``, ``load``) over an image source
    and a transform."""

    def __init__(self, source, indices: Sequence[int], transforms, training: bool):
        self.inner = LabelledImages(source, indices, [0] * len(indices), transforms, training)
        self.tensor, self.files, self.transform = None, [], None

    def __len__(self) -> int:
        return len(self.inner)

    def load(self, i: int) -> torch.Tensor:
        return self.inner.load(i)

    def take(self, idx: Sequence[int]) -> torch.Tensor:
        return torch.stack([self.inner.load(i) for i in idx])


@DATASETS.register("shards")
def shards(
    seed: int,
    paths: Annotated[
        Union[str, list[str]],
        Field(
            description="tar shards: brace patterns (train-{000000..000099}.tar), globs, files, or "
            "folders (every .tar in them)"
        ),
    ],
    format: Annotated[
        Literal["image_label", "image_text"],
        Field(
            description="image_label: an image and its class (.cls or json label) per sample; "
            "image_text: an image and its caption (.txt or json caption/captions)"
        ),
    ] = "image_label",
    val_paths: Annotated[
        Union[str, list[str], None],
        Field(description="validation shards; if absent, val_fraction of the samples is held out"),
    ] = None,
    val_fraction: ValFraction = 0.1,
    image_size: ImageSize = 32,
    channels: ImageChannels = 3,
    augment: Augment = None,
    normalize: NormalizeOption = None,
    bad_files: BadFiles = "error",
    decode_cache: DecodeCache = False,
    cache_dir: CacheDir = None,
) -> DataModule:
    """WebDataset tar shards, indexed once, read by random access in the platform's order."""
    from src.data.token_store import cache_root

    cache = cache_root(cache_dir)
    transforms = ImageTransforms(image_size, channels, augment, normalize)
    train_files = expand(paths, "data.paths")
    parts = [Indexed(train_files, cache, bad_files, "data.paths")]
    if val_paths is not None:
        parts.append(
            Indexed(expand(val_paths, "data.val_paths"), cache, bad_files, "data.val_paths")
        )
    records = [r for p in parts for r in p.records]
    n_train = len(parts[0].records)
    if len(parts) == 2:
        files = parts[0].images.shards + parts[1].images.shards
        locs = np.concatenate(
            [parts[0].images.locs, parts[1].images.locs + [len(parts[0].images.shards), 0, 0]]
        )
        source: Any = ShardImages(files, locs, parts[0].images.keys + parts[1].images.keys)
    else:
        source = parts[0].images
    source.draft = image_size if transforms.augment is None or decode_cache else None
    if decode_cache:
        from src.data.decoded import decoded

        identity = [p.identity for p in parts] + [[r["key"] for r in records]]
        source = decoded(source, identity, image_size, channels, cache)
    extra = {"shards": sum(len(p.images.shards) for p in parts), "decoded": decode_cache}
    if format == "image_label":
        labels = [_label(r, r["where"]) for r in records]
        if len(parts) == 2:
            train_idx, val_idx = list(range(n_train)), list(range(n_train, len(records)))
        else:
            tr, va = stratified_split(labels[:n_train], val_fraction, seed)
            train_idx, val_idx = tr.tolist(), va.tolist()
        names = _classes(train_files, labels)
        train = LabelledImages(source, train_idx, [labels[i] for i in train_idx], transforms, True)
        val = LabelledImages(source, val_idx, [labels[i] for i in val_idx], transforms, False)
        return labelled_module(train, val, names, (channels, image_size, image_size), extra)
    caps = [_captions(r, r["where"]) for r in records]
    if len(parts) == 2:
        train_idx, val_idx = list(range(n_train)), list(range(n_train, len(records)))
    else:
        order = np.random.default_rng(seed).permutation(n_train)
        n_val = max(1, int(round(val_fraction * n_train))) if val_fraction > 0 else 0
        val_idx, train_idx = sorted(order[:n_val].tolist()), sorted(order[n_val:].tolist())
    has_labels = all("cls" in records[i]["text"] for i in range(len(records)))
    labels_t = torch.tensor([_label(r, r["where"]) for r in records]) if has_labels else None
    train_images = SourceImages(source, train_idx, transforms, True)
    pairs = [(k, c) for k, i in enumerate(train_idx) for c in caps[i]]
    train_set = CaptionPairs(
        train_images, pairs, labels_t[train_idx] if labels_t is not None else None
    )
    val_set = (
        CaptionedImages(
            SourceImages(source, val_idx, transforms, False),
            [caps[i] for i in val_idx],
            labels_t[val_idx] if labels_t is not None else None,
        )
        if val_idx
        else None
    )
    info = DatasetInfo(
        num_samples=len(pairs),
        input_shape=(channels, image_size, image_size),
        extra={**extra, "captions": True},
    )
    return DataModule(train_set, val_set, info)
