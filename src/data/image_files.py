"""Image files at scale: a folder listed and checked once, and the labelled-image dataset every
image source (files, tar shards, decoded arrays) trains through.

Listing an ImageFolder-layout folder (``root/<class>/<...>/<image>``) and checking each image's
header costs about 0.1 ms a file: over a minute for ImageNet's 1.28 M files, at every start and
every resume. The outcome is kept in the data cache (``<cache>/listings/<hash of root>.json``: each
file's size, mtime and whether it was readable); a later start walks the folder and stats its
files (no file is opened) and checks only files that are new or changed. The order of files is
torchvision ``ImageFolder``'s, so splits and sample ids are the ones a run had before.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

import torch

from src.core.errors import ConfigError, DataError, library_message
from src.data.image_transforms import tensor_image

LISTING_VERSION = 1
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


def check_image(path_or_file) -> Optional[str]:
    """None if PIL can read the image's header and structure (``verify``: no decoding), else why
    not, in a few words."""
    from PIL import Image

    try:
        with Image.open(path_or_file) as im:
            im.verify()
        return None
    except Exception as exc:  # PIL raises many types for broken files
        return library_message(exc, 80) or type(exc).__name__


def _walk(root: str) -> tuple[list[str], list[tuple[str, int]]]:
    """Classes and (path, class index) in torchvision ImageFolder's order."""
    try:
        classes = sorted(e.name for e in os.scandir(root) if e.is_dir())
    except OSError as exc:
        raise ConfigError(f"{root}: cannot list ({exc.strerror or exc})") from None
    samples = []
    for c, name in enumerate(classes):
        for folder, _, files in sorted(os.walk(os.path.join(root, name), followlinks=True)):
            for f in sorted(files):
                if f.lower().endswith(IMAGE_EXTENSIONS):
                    samples.append((os.path.join(folder, f), c))
    return classes, samples


def _listing_file(cache: Path, root: str) -> Path:
    digest = hashlib.sha256(f"{LISTING_VERSION}:{root}".encode()).hexdigest()[:20]
    return cache / "listings" / f"{digest}.json"


def _read_listing(path: Path, root: str) -> dict[str, list]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if data.get("version") == LISTING_VERSION and data.get("root") == root:
            return data["files"]
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        pass  # missing or damaged: checked again, then rewritten
    return {}


def _write_listing(path: Path, root: str, files: dict[str, list]) -> None:
    """Atomically (a temporary name, then rename); a listing that cannot be written is only a
    slower next start."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"version": LISTING_VERSION, "root": root, "files": files}))
        os.replace(tmp, path)
    except OSError:
        pass


def _check(path: str, st: os.stat_result, old: Optional[list]) -> tuple[list, bool]:
    """``[size, mtime_ns, error]`` of an image, and whether it was opened: the cached outcome
    when size and mtime still match, else a new check."""
    if old is not None and old[0] == st.st_size and old[1] == st.st_mtime_ns:
        return old, False
    return [st.st_size, st.st_mtime_ns, check_image(path)], True


def checked_files(root: str, rels, cache: Optional[Path]) -> dict[str, Optional[str]]:
    """Whether each image ``root/rel`` is readable (None) or why not, each checked once: the
    outcomes are kept in the data cache under ``root`` as a folder's listing is, and a later call
    opens only files that are new or changed."""
    root = os.path.abspath(root)
    known = _read_listing(_listing_file(cache, root), root) if cache is not None else {}
    files = dict(known)
    out: dict[str, Optional[str]] = {}
    checked = 0
    for rel in rels:
        path = os.path.join(root, rel)
        try:
            st = os.stat(path)
        except OSError:
            out[rel] = "not found"
            continue
        files[rel], opened = _check(path, st, known.get(rel))
        out[rel] = files[rel][2]
        checked += opened
    if cache is not None and checked:
        _write_listing(_listing_file(cache, root), root, files)
    return out


class Listing:
    """A checked folder: ``classes``, ``samples`` ((path, class index), readable ones only),
    ``facts`` ([size, mtime_ns] of each sample, what says it changed), ``checked`` (how many files
    this start opened: 0 when nothing changed)."""

    def __init__(self, classes, samples, facts, checked: int, bad: list[tuple[str, str]]):
        self.classes, self.samples, self.facts = classes, samples, facts
        self.checked, self.bad = checked, bad


def checked_listing(root: str, key: str, bad_files: str, cache: Optional[Path]) -> Listing:
    """The images of ``root`` (ImageFolder layout), each checked once: unreadable ones stop the
    run (``bad_files=error``, naming the first) or are left out with a count (``skip``)."""
    if not Path(root).is_dir():
        raise ConfigError(f"data.{key}: folder not found: {root}")
    root = os.path.abspath(root)
    classes, listed = _walk(root)
    if not classes:
        raise ConfigError(f"data.{key}: {root}: no class folders (expected {root}/<class>/<image>)")
    known = _read_listing(_listing_file(cache, root), root) if cache is not None else {}
    files: dict[str, list] = {}
    samples, facts, bad = [], [], []
    checked = 0
    for path, c in listed:
        rel = os.path.relpath(path, root)
        try:
            st = os.stat(path)
        except OSError as exc:
            bad.append((path, exc.strerror or str(exc)))
            continue
        files[rel], opened = _check(path, st, known.get(rel))
        checked += opened
        error = files[rel][2]
        if error is not None:
            bad.append((path, error))
        else:
            samples.append((path, c))
            facts.append([st.st_size, st.st_mtime_ns])
    if cache is not None and (checked or len(files) != len(known)):
        _write_listing(_listing_file(cache, root), root, files)
    present = {c for _, c in samples}
    empty = [name for i, name in enumerate(classes) if i not in present]
    if bad and bad_files == "error":
        path, why = bad[0]
        more = f" ({len(bad)} unreadable files in all)" if len(bad) > 1 else ""
        raise ConfigError(
            f"data.{key}: {path}: not a readable image ({why}){more}; fix or remove it, or set "
            "data.bad_files=skip"
        )
    if empty and not bad:
        raise ConfigError(
            f"data.{key}: {root}: no image in class folder(s) {', '.join(empty[:5])} (images end "
            f"in {', '.join(IMAGE_EXTENSIONS)})"
        )
    if bad:
        warnings.warn(
            f"data.{key}: skipped {len(bad)} unreadable images (data.bad_files=skip)", stacklevel=2
        )
    return Listing(classes, samples, facts, checked, bad)


def open_rgb(im, draft: Optional[int] = None):
    """An opened PIL image as RGB. With ``draft`` (the side it is resized to next, no crop in
    between), a JPEG is decoded at the smallest power-of-two reduction at least that large
    (libjpeg's DCT scaling, as PIL's ``thumbnail`` does): 96 px images for 32 px training decode
    at 48 px, about 25% faster, the pixels after the resize within a level or two of a full
    decode."""
    if draft:
        im.draft("RGB", (draft, draft))
    return im.convert("RGB")


class FileImages:
    """Images read from files when asked (PIL, converted to RGB as ImageFolder's loader does)."""

    decoded = False

    def __init__(self, paths: Sequence[str], draft: Optional[int] = None):
        self.paths, self.draft = list(paths), draft

    def __len__(self) -> int:
        return len(self.paths)

    def image(self, i: int):
        from PIL import Image

        with Image.open(self.paths[i]) as im:
            return open_rgb(im, self.draft)

    def where(self, i: int) -> str:
        return str(self.paths[i])


def read_image(source, i: int):
    """Image ``i`` of a source; damage the header check missed is one line naming it."""
    try:
        return source.image(i)
    except (OSError, SyntaxError, ValueError) as exc:
        raise DataError(
            f"{source.where(i)}: unreadable image ({library_message(exc, 80)})"
        ) from None


def labelled_module(train, val, names: Sequence[str], shape: tuple, extra=None):
    """The DataModule of labelled images: classes, training counts per class, input shape (an
    empty validation split is None)."""
    from src.core.dataset_info import DataModule, DatasetInfo

    counts = torch.bincount(
        torch.tensor(list(train.targets), dtype=torch.long), minlength=len(names)
    )
    info = DatasetInfo(
        num_samples=len(train),
        num_classes=len(names),
        class_names=tuple(names),
        class_counts=tuple(int(c) for c in counts),
        input_shape=tuple(shape),
        extra=dict(extra or {}),
    )
    return DataModule(train, val if val is not None and len(val) else None, info)


class LabelledImages(torch.utils.data.Dataset):
    """Samples ``indices`` of an image source with their class: ``{"inputs", "labels"}`` dicts,
    the platform's batch format. ``source.image(i)`` is a PIL image (or, for decoded arrays,
    a uint8 tensor); ``transform`` is the dataset's training or evaluation transform.
    ``view_transform`` is set by tasks that train on augmented views."""

    def __init__(self, source, indices, targets, transforms, training: bool):
        self.source, self.indices = source, list(indices)
        self.targets = [int(t) for t in targets]
        self.transforms, self.training = transforms, training
        self.view_transform = None

    def __len__(self) -> int:
        return len(self.indices)

    def load(self, i: int) -> torch.Tensor:
        x = read_image(self.source, self.indices[i])
        if self.source.decoded:
            return tensor_image(x, self.transforms, self.training)
        return (self.transforms.train if self.training else self.transforms.eval)(x)

    def __getitem__(self, i: int) -> dict[str, Any]:
        x = self.load(i)
        sample = {"inputs": x, "labels": torch.tensor(self.targets[i])}
        if self.view_transform is not None:
            sample["views"] = self.view_transform(x)
        return sample
