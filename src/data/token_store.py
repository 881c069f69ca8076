"""Token stores: a corpus tokenized once into memory-mapped shards, reused by every run that asks
for the same content.

A store is a folder ``<cache>/tokens/<key>/``::

    manifest.json      format version, key, dtype, token and document counts, shards, sources
    tokens-00000.bin   token ids, flat (uint16 when the vocabulary fits, else uint32), at most
    tokens-00001.bin   SHARD_TOKENS per shard
    docs.bin           int64 end offset of each document in the token stream

The key is a hash of exactly what changes the content: every source file (path, size,
mtime_ns), the tokenizer (a hash of its serialized form and special tokens), the format and its
options, and :data:`VERSION`. Block size is not in it: blocks are cut from the stream when read,
so runs with different ``block_size`` share a store.

A store is built streaming (documents read and tokenized a chunk at a time, written as they
come: memory is bounded by a chunk), in ``<key>.build/`` under an ``flock`` on ``<key>.lock``,
fsynced and renamed into place: a reader sees a whole store or none. Two processes (two runs,
two ranks, two nodes on a filesystem with ``flock``) that need one store build it once; the
others wait for the lock and open what it built. A build killed half way leaves ``<key>.build/``,
which the next builder removes. Opening checks every shard's size and a checksum of its first and
last :data:`SAMPLE_BYTES`; a mismatch is a one-line error naming the file.

The cache folder is ``data.cache_dir``, else ``$TESSERA_CACHE``, else
``$XDG_CACHE_HOME/tessera`` (``~/.cache/tessera``). Deleting a store (or the folder) is always
safe: the next run builds it again.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import shutil
import sys
import time
import zlib
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, BinaryIO, Optional

import numpy as np

from src.core.checkpoint import fsync_path
from src.core.console import duration
from src.core.errors import DataError

VERSION = 1
SHARD_TOKENS = 1 << 28  # 256 Mi tokens: 512 MiB of uint16 (1 GiB of uint32) per shard
SAMPLE_BYTES = 1 << 16  # checksummed at each end of a shard when a store is opened
MANIFEST = "manifest.json"


def cache_root(cache_dir: Optional[str] = None) -> Path:
    """``cache_dir``, else ``$TESSERA_CACHE``, else ``$XDG_CACHE_HOME/tessera`` (~/.cache/tessera)."""
    if cache_dir:
        return Path(cache_dir).expanduser()
    if os.environ.get("TESSERA_CACHE"):
        return Path(os.environ["TESSERA_CACHE"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "tessera"


def file_facts(files: Iterable[Path], key: str = "data.paths") -> list[list]:
    """``[path, size, mtime_ns]`` of each file: what says a source changed."""
    out = []
    for f in files:
        try:
            st = os.stat(f)
        except OSError as exc:
            raise DataError(f"{key}: {f}: cannot read ({exc.strerror or exc})") from None
        out.append([os.path.abspath(f), st.st_size, st.st_mtime_ns])
    return out


def tokenizer_hash(tok) -> str:
    """A hash of what decides a tokenizer's ids: its serialized form (tokenizer.json's content)
    and its special tokens. The same for a tokenizer and the one loaded from its saved folder."""
    h = hashlib.sha256()
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode())
    else:  # a slow tokenizer: its vocabulary in id order
        h.update(json.dumps(sorted(tok.get_vocab().items(), key=lambda kv: kv[1])).encode())
    h.update(json.dumps(tok.special_tokens_map, sort_keys=True, default=str).encode())
    return h.hexdigest()[:16]


def store_key(**content: Any) -> str:
    """A hash of ``content`` (JSON-able) and the store format version."""
    text = json.dumps({"version": VERSION, **content}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def _sample_crc(path: Path, size: int) -> int:
    with open(path, "rb") as f:
        crc = zlib.crc32(f.read(SAMPLE_BYTES))
        if size > SAMPLE_BYTES:
            f.seek(max(SAMPLE_BYTES, size - SAMPLE_BYTES))
            crc = zlib.crc32(f.read(SAMPLE_BYTES), crc)
    return crc


class TokenStore:
    """An opened store: ``len(store)`` tokens, read as ``store.read(start, length)`` or
    gathered as blocks by :meth:`blocks`; nothing of the stream is in memory but the pages read."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        path = self.folder / MANIFEST
        try:
            self.manifest = json.loads(path.read_text(encoding="utf-8"))
            assert self.manifest["version"] == VERSION
            shards = self.manifest["shards"]
        except (OSError, ValueError, KeyError, TypeError, AssertionError):
            raise DataError(
                f"data: token store {path}: unreadable manifest; delete the folder "
                "and run again to rebuild it"
            ) from None
        self.dtype = np.dtype(self.manifest["dtype"])
        self.maps: list[np.ndarray] = []
        starts = [0]
        for s in shards:
            f = self.folder / s["file"]
            size = f.stat().st_size if f.is_file() else -1
            if size != s["tokens"] * self.dtype.itemsize:
                raise DataError(
                    f"data: token store shard {f}: {size if size >= 0 else 'missing'} bytes, its "
                    f"manifest says {s['tokens'] * self.dtype.itemsize}: delete {self.folder} and "
                    "run again to rebuild it"
                )
            if size and _sample_crc(f, size) != s["sample_crc32"]:
                raise DataError(
                    f"data: token store shard {f}: checksum does not match its manifest (the file "
                    f"changed after it was written): delete {self.folder} and run again"
                )
            if s["tokens"]:
                self.maps.append(np.memmap(f, dtype=self.dtype, mode="r", shape=(s["tokens"],)))
                starts.append(starts[-1] + s["tokens"])
        self.starts = np.asarray(starts, dtype=np.int64)  # shard i holds [starts[i], starts[i+1])
        self.tokens = int(self.starts[-1])
        n_docs = self.manifest["documents"]
        docs = self.folder / "docs.bin"
        self.doc_ends = (
            np.memmap(docs, dtype=np.int64, mode="r", shape=(n_docs,))
            if n_docs
            else np.zeros(0, np.int64)
        )

    def __len__(self) -> int:
        return self.tokens

    def read(self, start: int, length: int) -> np.ndarray:
        """Tokens ``[start, start + length)`` (a view when they lie in one shard)."""
        i = int(np.searchsorted(self.starts, start, side="right")) - 1
        lo = start - int(self.starts[i])
        if lo + length <= len(self.maps[i]):
            return self.maps[i][lo : lo + length]
        parts, left = [], length
        while left:
            part = self.maps[i][lo : lo + left]
            parts.append(part)
            left -= len(part)
            i, lo = i + 1, 0
        return np.concatenate(parts)

    def blocks(self, indices: np.ndarray, block_size: int) -> np.ndarray:
        """Blocks ``indices`` of ``block_size`` tokens, as one (n, block_size) int64 array: one
        gather per shard (a block across a shard boundary is read in two pieces)."""
        starts = np.asarray(indices, dtype=np.int64) * block_size
        out = np.empty((len(starts), block_size), dtype=np.int64)
        shard = np.searchsorted(self.starts, starts, side="right") - 1
        inside = starts + block_size <= self.starts[shard + 1]
        offsets = np.arange(block_size, dtype=np.int64)
        for i in np.unique(shard[inside]):
            rows = np.flatnonzero(inside & (shard == i))
            out[rows] = self.maps[i][(starts[rows] - self.starts[i])[:, None] + offsets]
        for r in np.flatnonzero(~inside):
            out[r] = self.read(int(starts[r]), block_size)
        return out

    def __getstate__(self):  # a DataLoader worker maps the files itself: never pickle the data
        return {"folder": self.folder}

    def __setstate__(self, state):
        self.__init__(state["folder"])


class _Writer:
    """Appends documents' ids to shards in a build folder; ``finish`` writes the manifest."""

    def __init__(self, folder: Path, dtype: np.dtype):
        self.folder, self.dtype = folder, dtype
        self.shards: list[dict] = []
        self.docs = open(folder / "docs.bin", "wb")
        self.tokens = self.documents = 0
        self.file: Optional[BinaryIO] = None
        self.in_shard = 0

    def _next_shard(self) -> None:
        self._close_shard()
        name = f"tokens-{len(self.shards):05d}.bin"
        self.file = open(self.folder / name, "wb")
        self.shards.append({"file": name, "tokens": 0})
        self.in_shard = 0

    def _close_shard(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None

    def add(self, docs: list[np.ndarray]) -> None:
        ends = []
        for ids in docs:
            ids = ids.astype(self.dtype, copy=False)
            while len(ids):
                if self.file is None or self.in_shard == SHARD_TOKENS:
                    self._next_shard()
                assert self.file is not None
                take = ids[: SHARD_TOKENS - self.in_shard]
                self.file.write(take.tobytes())
                self.in_shard += len(take)
                self.shards[-1]["tokens"] += len(take)
                self.tokens += len(take)
                ids = ids[len(take) :]
            ends.append(self.tokens)
        self.documents += len(ends)
        self.docs.write(np.asarray(ends, dtype=np.int64).tobytes())

    def finish(self, manifest: dict) -> None:
        self._close_shard()
        self.docs.close()
        if not self.shards:
            self._next_shard()
            self._close_shard()
        for s in self.shards:
            f = self.folder / s["file"]
            s["sample_crc32"] = _sample_crc(f, f.stat().st_size)
            fsync_path(f)
        fsync_path(self.folder / "docs.bin")
        manifest = {
            **manifest,
            "version": VERSION,
            "dtype": self.dtype.name,
            "tokens": self.tokens,
            "documents": self.documents,
            "shards": self.shards,
        }
        (self.folder / MANIFEST).write_text(json.dumps(manifest, indent=1), encoding="utf-8")
        fsync_path(self.folder / MANIFEST)


@contextlib.contextmanager
def locked(path: Path, what: str) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            say(f"store    waiting for another process building {what}")
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def say(line: str) -> None:
    """A line on the console's stderr, also while a config's output is held."""
    err = getattr(sys.stderr, "real", sys.stderr)
    print(line, file=err, flush=True)


class Progress:
    """A store build's progress (files, MB, MB/s, ETA): a bar on a terminal (rich), else a plain
    line every ``every`` seconds. The bar starts at the first update; ``close()`` ends it."""

    def __init__(self, what: str, files: int, total_bytes: int, every: float = 10.0, stream=None):
        self.what, self.files, self.total = what, files, max(1, total_bytes)
        self.t0 = self.last = time.perf_counter()
        self.every = every
        self.stream = stream if stream is not None else getattr(sys.stderr, "real", sys.stderr)
        isatty = getattr(self.stream, "isatty", None)
        self.terminal = bool(isatty and isatty())
        self.bar: Any = None

    def update(self, files_done: int, bytes_done: int) -> None:
        if self.terminal:
            if self.bar is None:
                self._start_bar()
            self.bar.update(self.task, completed=bytes_done, files=f"{files_done:,}/{self.files:,}")
            return
        now = time.perf_counter()
        if now - self.last < self.every:
            return
        self.last = now
        rate = bytes_done / max(now - self.t0, 1e-9)
        eta = (self.total - bytes_done) / max(rate, 1e-9)
        say(
            f"store    tokenizing {self.what}: {files_done:,}/{self.files:,} files, "
            f"{bytes_done / 1e6:,.0f}/{self.total / 1e6:,.0f} MB, {rate / 1e6:.1f} MB/s, "
            f"ETA {duration(eta)}"
        )

    def _start_bar(self) -> None:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            TextColumn,
            TimeRemainingColumn,
            TransferSpeedColumn,
        )
        from rich.progress import Progress as Bar

        self.bar = Bar(
            TextColumn("store    tokenizing {task.description}"),
            BarColumn(),
            TextColumn("{task.fields[files]} files"),
            DownloadColumn(),
            TransferSpeedColumn(),
            TimeRemainingColumn(),
            console=Console(file=self.stream, force_terminal=True),
        )
        self.task = self.bar.add_task(self.what, total=self.total, files=f"0/{self.files:,}")
        self.bar.start()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
            self.bar = None


def dtype_for(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


def open_or_build(
    root: Path,
    key: str,
    vocab_size: int,
    documents: Iterable[list[np.ndarray]],
    manifest: dict,
    what: str,
) -> tuple[TokenStore, Optional[float]]:
    """The store ``key`` under ``root/tokens``: opened when built, else built from
    ``documents`` (an iterable of chunks, each a list of documents' ids) and opened. Returns it and
    the seconds its build took (None: it was there)."""
    folder = root / "tokens" / key
    if (folder / MANIFEST).is_file():
        return TokenStore(folder), None
    with locked(root / "tokens" / f"{key}.lock", what):
        if (folder / MANIFEST).is_file():  # another process built it while this one waited
            return TokenStore(folder), None
        build = root / "tokens" / f"{key}.build"
        shutil.rmtree(build, ignore_errors=True)  # a build killed half way
        t0 = time.perf_counter()
        try:
            build.mkdir(parents=True)
            writer = _Writer(build, dtype_for(vocab_size))
            for chunk in documents:
                writer.add(chunk)
            seconds = time.perf_counter() - t0
            writer.finish({**manifest, "key": key, "build_seconds": round(seconds, 2)})
            fsync_path(build)
            os.rename(build, folder)
            fsync_path(folder.parent)
        except OSError as exc:
            shutil.rmtree(build, ignore_errors=True)
            full = exc.errno in (errno.ENOSPC, errno.EDQUOT)
            raise DataError(
                f"data: building token store {folder}: "
                + ("no space left on the device" if full else str(exc.strerror or exc))
                + " (set data.cache_dir or TESSERA_CACHE to a folder with room)"
                * (exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EROFS))
            ) from None
        except BaseException:
            shutil.rmtree(build, ignore_errors=True)
            raise
    return TokenStore(folder), seconds
