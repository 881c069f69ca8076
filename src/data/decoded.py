"""Images decoded once (``data.decode_cache: true``): every image of a dataset resized to
``image_size`` square and kept as one uint8 (N, C, H, W) memory-mapped array in the data cache,
FFCV's idea. An epoch then decodes no JPEG; augmentation runs on the decoded image.

An entry is ``<cache>/decoded/<key>/`` with ``images.u8`` and ``manifest.json``; the key is a hash
of every source image's identity (path, size, mtime; or shard, size, mtime and member), the size,
the channels and :data:`VERSION`. It is built by one process under a lock, in parallel worker
processes, into ``<key>.build/`` and renamed when complete; it is checked (size, a checksum of
its ends) when opened, like a token store.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from src.core.checkpoint import fsync_path
from src.core.errors import DataError
from src.data.token_store import _sample_crc, locked, say, store_key

VERSION = 1


class _Decode(torch.utils.data.Dataset):
    def __init__(self, source, size: int, channels: int):
        from src.data.image_transforms import ImageTransforms

        self.source = source
        self.tf = ImageTransforms(size, channels).resized_uint8

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i: int) -> torch.Tensor:
        from src.data.image_files import read_image

        return self.tf(read_image(self.source, i))


class DecodedImages:
    """A built entry, read as ``image(i)`` -> uint8 (C, H, W) tensor (a copy of a memory-mapped
    row); the same interface as the sources it was decoded from."""

    decoded = True

    def __init__(self, folder: Path, where_of=None):
        self.folder = Path(folder)
        self.where_of = where_of
        m = json.loads((self.folder / "manifest.json").read_text(encoding="utf-8"))
        shape = tuple(m["shape"])
        f = self.folder / "images.u8"
        size = f.stat().st_size if f.is_file() else -1
        if size != int(np.prod(shape)) or (size and _sample_crc(f, size) != m["sample_crc32"]):
            raise DataError(
                f"data.decode_cache: {f} does not match its manifest (changed after it was "
                f"written): delete {self.folder} and run again to rebuild it"
            )
        self.array = np.memmap(f, dtype=np.uint8, mode="r", shape=shape)

    def __len__(self) -> int:
        return len(self.array)

    def image(self, i: int) -> torch.Tensor:
        return torch.from_numpy(np.array(self.array[i]))

    def where(self, i: int) -> str:
        return self.where_of(i) if self.where_of is not None else f"decoded image {i}"

    def __getstate__(self):  # a worker maps the file itself: never pickle the pixels
        return {"folder": self.folder, "where_of": self.where_of}

    def __setstate__(self, state):
        self.__init__(state["folder"], state["where_of"])


def decoded(source, identity: Any, size: int, channels: int, root: Path) -> DecodedImages:
    """The decoded array of ``source`` (``len``, ``image(i)``, ``where(i)``), built when missing.
    ``identity`` (JSON-able) is what says the source images changed."""
    key = store_key(kind="decoded", version=VERSION, identity=identity, size=size, ch=channels)
    base = root / "decoded"
    folder = base / key
    if (folder / "manifest.json").is_file():
        return DecodedImages(folder, source.where)
    with locked(base / f"{key}.lock", "the decoded images"):
        if (folder / "manifest.json").is_file():
            return DecodedImages(folder, source.where)
        build = base / f"{key}.build"
        shutil.rmtree(build, ignore_errors=True)
        build.mkdir(parents=True)
        shape = (len(source), channels, size, size)
        t0 = time.perf_counter()
        try:
            out = np.memmap(build / "images.u8", dtype=np.uint8, mode="w+", shape=shape)
            workers = min(8, os.cpu_count() or 1)
            loader = torch.utils.data.DataLoader(
                _Decode(source, size, channels),
                batch_size=256,
                num_workers=workers if len(source) > 2048 else 0,
                collate_fn=torch.stack,
            )
            say(f"store    decoding {len(source):,} images to {size}x{size} into {folder}")
            done = 0
            for batch in loader:
                out[done : done + len(batch)] = batch.numpy()
                done += len(batch)
            out.flush()
            del out
            f = build / "images.u8"
            seconds = time.perf_counter() - t0
            manifest = {
                "version": VERSION,
                "key": key,
                "shape": list(shape),
                "sample_crc32": _sample_crc(f, f.stat().st_size),
                "build_seconds": round(seconds, 2),
            }
            fsync_path(f)
            (build / "manifest.json").write_text(json.dumps(manifest, indent=1), encoding="utf-8")
            fsync_path(build / "manifest.json")
            os.rename(build, folder)
            fsync_path(base)
        except BaseException:
            shutil.rmtree(build, ignore_errors=True)
            raise
        say(f"store    decoded {len(source):,} images in {seconds:.1f} s")
    return DecodedImages(folder, source.where)
