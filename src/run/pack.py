"""``python -m src.main pack --from SOURCE --out DIR [--shard-size 1GB] [--resize N]``: write a
dataset as WebDataset tar shards that ``data: {type: shards, paths: DIR}`` trains from.

SOURCE is one of:

- an image folder (``root/<class>/<image>``): ``<key>.<jpg|png|...>`` and ``<key>.cls`` per image
  (format ``image_label``; the manifest keeps the class names);
- a captions file, JSONL (``{"image", "caption"}`` lines) or COCO captions JSON, with images
  relative to its folder (or ``--root``): ``<key>.<ext>``, ``<key>.txt`` (the first caption) and
  ``<key>.json`` (every caption) per image (format ``image_text``);
- a Hugging Face dataset saved with ``save_to_disk``, or its data files, with ``image`` and
  ``label`` columns (format ``image_label``).

Every source image is checked before anything is written; an unreadable one stops the packing with
its path (or, with ``--bad-files skip``, is left out and counted). Images are copied byte for byte,
or with ``--resize N`` re-encoded as JPEG (quality 95) with their shorter side N. Shards and the
manifest are written atomically; see :mod:`src.data.shard_writer` for resuming and refusing.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Optional

from src.core.errors import ArgumentParser, ConfigError, DataError, library_message


def _resized(data: bytes, size: Optional[int]) -> tuple[bytes, Optional[str]]:
    """The image bytes as they go into the shard, and their extension if re-encoded."""
    if not size:
        return data, None
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        im = im.convert("RGB")
        w, h = im.size
        scale = size / min(w, h)
        im = im.resize(
            (max(1, round(w * scale)), max(1, round(h * scale))), Image.Resampling.BICUBIC
        )
        buf = io.BytesIO()
        im.save(buf, format="JPEG", quality=95)
    return buf.getvalue(), "jpg"


def _ext(path: str) -> str:
    ext = Path(path).suffix.lower().lstrip(".")
    return "jpg" if ext == "jpeg" else ext


class Source:
    """What to pack: ``count`` samples, ``items()`` yielding (source path or row, image bytes,
    image extension, text members), the ``identity`` (what says the source changed), the
    ``format`` and what the manifest adds (``extra``)."""

    def __init__(
        self,
        description: str,
        fmt: str,
        count: int,
        items: Callable[[], Iterator[tuple[str, bytes, str, dict[str, bytes]]]],
        identity: Any,
        extra: dict,
        skipped: int = 0,
    ):
        self.description, self.format, self.count = description, fmt, count
        self.items, self.identity, self.extra, self.skipped = items, identity, extra, skipped


def _read(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as exc:
        raise DataError(f"--from: {path}: cannot read ({exc.strerror or exc})") from None


def _refuse(bad: list[tuple[str, str]], bad_files: str) -> None:
    """With ``--bad-files error``, the first bad image (where, why) stops the packing."""
    if not bad or bad_files != "error":
        return
    where, why = bad[0]
    more = f" ({len(bad)} bad images in all)" if len(bad) > 1 else ""
    what = why if why == "not found" else f"not a readable image ({why})"
    raise DataError(f"--from: {where}: {what}{more}; fix it, or pass --bad-files skip")


def _image_folder(root: str, bad_files: str) -> Source:
    import warnings

    from src.data.image_files import checked_listing
    from src.data.token_store import cache_root

    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        listing = checked_listing(root, "root", bad_files, cache_root())
    base = os.path.abspath(root)

    def items():
        for path, c in listing.samples:
            yield os.path.relpath(path, base), _read(path), _ext(path), {"cls": str(c).encode()}

    facts = [[os.path.relpath(p, base), *f] for (p, _), f in zip(listing.samples, listing.facts)]
    identity = [listing.classes, facts]
    return Source(
        f"image folder {base}",
        "image_label",
        len(listing.samples),
        items,
        identity,
        {"classes": listing.classes},
        len(listing.bad),
    )


def _captions(captions: str, root: Optional[str], bad_files: str) -> Source:
    from src.data.image_files import check_image
    from src.data.image_text import _caption_rows

    base = Path(root).expanduser() if root else Path(captions).expanduser().parent
    if not base.is_dir():
        raise ConfigError(f"--root: folder not found: {base}")
    by_image: dict[str, list[str]] = {}
    for rel, caption, _where in _caption_rows(base, captions):
        by_image.setdefault(rel, []).append(caption)
    names: list[str] = []
    bad: list[tuple[str, str]] = []
    for rel in by_image:
        path = base / rel
        why = "not found" if not path.is_file() else check_image(path)
        if why:
            bad.append((rel, why))
        else:
            names.append(rel)
    _refuse([(str(base / rel), why) for rel, why in bad], bad_files)
    facts = []
    for rel in names:
        st = os.stat(base / rel)
        facts.append([rel, st.st_size, st.st_mtime_ns, by_image[rel]])

    def items():
        for rel in names:
            caps = by_image[rel]
            meta = json.dumps({"captions": caps, "source": rel}).encode()
            yield rel, _read(str(base / rel)), _ext(rel), {"txt": caps[0].encode(), "json": meta}

    return Source(f"captions {captions}", "image_text", len(names), items, facts, {}, len(bad))


def _hf(path: str, split: str, bad_files: str) -> Source:
    from src.data.hf import _datasets, load_splits
    from src.data.image_files import check_image
    from src.data.token_store import cache_root, file_facts

    ds_lib = _datasets()
    ds, _, files = load_splits(path, split, None, None, cache_root())
    for col in ("image", "label"):
        if col not in ds.column_names:
            raise ConfigError(
                f"--from: {path}: no '{col}' column (it has: {', '.join(ds.column_names)})"
            )
    ds = ds.cast_column("image", ds_lib.Image(decode=False))
    feature = ds.features["label"]
    raw = list(ds["label"])
    if isinstance(feature, ds_lib.ClassLabel):
        classes, labels = list(feature.names), [int(v) for v in raw]
    else:
        if any(v is None for v in raw):
            raise DataError(f"--from: {path}: a row has no label")
        classes = sorted({str(v) for v in raw})
        index = {n: k for k, n in enumerate(classes)}
        labels = [index[str(v)] for v in raw]

    def image_bytes(row: int) -> bytes:
        cell = ds[row]["image"]
        if cell.get("bytes"):
            return cell["bytes"]
        return _read(cell["path"])

    rows: list[int] = []
    bad: list[tuple[int, str]] = []
    for r in range(len(ds)):
        why = check_image(io.BytesIO(image_bytes(r)))
        if why:
            bad.append((r, why))
        else:
            rows.append(r)
    _refuse([(f"{path} row {r}", why) for r, why in bad], bad_files)

    def items():
        from PIL import Image

        for r in rows:
            data = image_bytes(r)
            with Image.open(io.BytesIO(data)) as im:
                ext = {"JPEG": "jpg"}.get(im.format or "", (im.format or "png").lower())
            yield f"row {r}", data, ext, {"cls": str(labels[r]).encode()}

    identity = [file_facts(files, "--from"), split]
    return Source(
        f"dataset {path} ({split})",
        "image_label",
        len(rows),
        items,
        identity,
        {"classes": classes},
        len(bad),
    )


def _source(args) -> Source:
    p = Path(args.source).expanduser()
    if not p.exists():
        raise ConfigError(f"--from: not found: {args.source}")
    if p.is_file() and p.suffix in (".jsonl", ".json"):
        return _captions(str(p), args.root, args.bad_files)
    from src.data.hf import _saved

    if p.is_dir() and (_saved(p) or args.split != "train"):
        return _hf(str(p), args.split, args.bad_files)
    if p.is_dir():
        if not any(e.is_dir() for e in os.scandir(p)) and any(
            f.suffix in (".parquet", ".arrow", ".csv") for f in p.iterdir()
        ):
            return _hf(str(p), args.split, args.bad_files)
        return _image_folder(str(p), args.bad_files)
    if p.suffix in (".parquet", ".arrow", ".csv"):
        return _hf(str(p), args.split, args.bad_files)
    raise ConfigError(
        f"--from: {args.source}: not an image folder, a captions file (.jsonl, COCO .json) or a "
        "Hugging Face dataset"
    )


def main(argv: list[str]) -> int:
    p = ArgumentParser(
        prog="python -m src.main pack",
        description="Write an image folder, a captions file or a Hugging Face dataset as "
        "WebDataset tar shards (data: {type: shards, paths: OUT}).",
    )
    p.add_argument(
        "--from", dest="source", required=True, help="image folder, captions file or dataset"
    )
    p.add_argument("--out", required=True, help="output folder (empty, or this packing's own)")
    p.add_argument("--shard-size", default="1GB", help="bytes per shard (default 1GB)")
    p.add_argument("--resize", type=int, help="re-encode as JPEG with the shorter side N pixels")
    p.add_argument("--root", help="folder the captions' image paths are relative to")
    p.add_argument("--split", default="train", help="split of a Hugging Face dataset")
    p.add_argument("--bad-files", choices=("error", "skip"), default="error")
    args = p.parse_args(argv)
    if args.resize is not None and args.resize <= 0:
        raise ConfigError(f"--resize: must be > 0, got {args.resize}")
    from src.core.console import duration
    from src.data.shard_writer import Packing, parse_size, skip

    shard_bytes = parse_size(args.shard_size)
    t0 = time.perf_counter()
    src = _source(args)
    if src.count == 0:
        raise DataError(f"--from: {args.source}: no readable image to pack")
    options = {"resize": args.resize, "shard_size": shard_bytes, "format": src.format}
    text = json.dumps([src.identity, options], sort_keys=True, default=str)
    identity = hashlib.sha256(text.encode()).hexdigest()[:20]
    packing = Packing(Path(args.out), identity, src.description, options)
    if packing.finished is not None:
        m = packing.finished
        print(
            f"packed   already: {m['samples']:,} samples in {len(m['shards'])} shards in {args.out}"
        )
        return 0
    start = packing.samples_done
    if start:
        print(f"pack     resuming after {len(packing.done)} finished shards ({start:,} samples)")
    if src.skipped:
        print(f"pack     leaving out {src.skipped} unreadable images (--bad-files skip)")

    def samples():
        for n, (origin, data, ext, text_members) in enumerate(skip(src.items(), start), start):
            try:
                body, new_ext = _resized(data, args.resize)
            except Exception as exc:  # PIL raises many types
                why = library_message(exc, 80)
                raise DataError(f"--from: {origin}: not a readable image ({why})") from None
            yield f"{n:08d}", {new_ext or ext: body, **text_members}

    def said(rec: dict) -> None:
        print(
            f"shard    {rec['file']}: {rec['samples']:,} samples, {rec['bytes'] / 1e6:,.1f} MB",
            flush=True,
        )

    packing.write(samples(), shard_bytes, said)
    m = packing.finish({"format": src.format, **src.extra, "skipped": src.skipped})
    print(
        f"packed   {m['samples']:,} samples in {len(m['shards'])} shards, {m['bytes'] / 1e6:,.1f} MB, "
        f"in {duration(time.perf_counter() - t0)}: {args.out}"
    )
    print(f"train    data: {{type: shards, paths: {args.out}, format: {src.format}}}")
    return 0
