"""Writing WebDataset tar shards: ``python -m src.main pack`` (see :mod:`src.run.pack`).

An output folder holds one packing::

    pack.json               what is being packed (source, its identity, options), written first
    shard-000000.tar ...    each written as shard-NNNNNN.tar.tmp, fsynced, then renamed
    pack.progress.jsonl     one line per finished shard (file, samples, bytes)
    manifest.json           written last (atomically): shards, counts, classes, sizes

A packing stopped half way resumes from its last finished shard when run again with the same
source and options; a folder holding another packing (or anything else) is refused, so two
packings are never mixed.
"""

from __future__ import annotations

import io
import json
import os
import re
import tarfile
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, Optional

from src.core.checkpoint import fsync_path
from src.core.errors import ConfigError

PLAN, PROGRESS, MANIFEST = "pack.json", "pack.progress.jsonl", "manifest.json"
PACK_VERSION = 1
_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12}
_UNITS.update({"kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40})


def parse_size(text: str, key: str = "--shard-size") -> int:
    """``1GB``, ``500MB``, ``64MiB``, ``1e9`` or a byte count."""
    m = re.fullmatch(r"\s*([0-9.eE+]+)\s*([a-zA-Z]*)\s*", str(text))
    unit = m.group(2).lower() if m else ""
    try:
        if m is None or unit not in _UNITS:
            raise ValueError
        value = int(float(m.group(1)) * _UNITS[unit])
    except ValueError:
        raise ConfigError(f"{key}: {text!r} is not a size (e.g. 1GB, 500MB, 64MiB)") from None
    if value < 1024:
        raise ConfigError(f"{key}: {text!r} is smaller than 1 KB")
    return value


def _atomic_json(path: Path, data: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1), encoding="utf-8")
    fsync_path(tmp)
    os.replace(tmp, path)
    fsync_path(path.parent)


class Packing:
    """An output folder claimed for one packing (``identity``): fresh, resumed, or finished."""

    def __init__(self, out: Path, identity: str, source: str, options: dict):
        self.out, self.identity = Path(out), identity
        self.plan = {
            "version": PACK_VERSION,
            "identity": identity,
            "source": source,
            "options": options,
        }
        self.done: list[dict] = []
        self.finished: Optional[dict] = None
        if self.out.exists() and not self.out.is_dir():
            raise ConfigError(f"--out: {out} is a file, not a folder")
        plan_file = self.out / PLAN
        if plan_file.is_file():
            try:
                held = json.loads(plan_file.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                raise ConfigError(
                    f"--out: {plan_file} is unreadable; delete {out} to pack again"
                ) from None
            if held.get("identity") != identity:
                raise ConfigError(
                    f"--out: {out} holds a packing of {held.get('source')} with options "
                    f"{held.get('options')}; this one differs: choose another --out, or delete it"
                )
            manifest = self.out / MANIFEST
            if manifest.is_file():
                self.finished = json.loads(manifest.read_text(encoding="utf-8"))
                return
            self._read_progress()
        elif self.out.is_dir() and any(self.out.iterdir()):
            raise ConfigError(
                f"--out: {out} is not empty and holds no packing; choose an empty folder"
            )

    def _read_progress(self) -> None:
        progress = self.out / PROGRESS
        if progress.is_file():
            for line in progress.read_text(encoding="utf-8").splitlines():
                try:
                    rec = json.loads(line)
                except ValueError:
                    break  # a line cut by a kill: that shard is written again
                if (self.out / rec["file"]).is_file():
                    self.done.append(rec)
        for stray in self.out.glob("*.tmp"):
            stray.unlink()

    @property
    def samples_done(self) -> int:
        return sum(r["samples"] for r in self.done)

    def write(
        self,
        samples: Iterable[tuple[str, dict[str, bytes]]],
        shard_bytes: int,
        on_shard=None,
    ) -> list[dict]:
        """Write ``samples`` ((key, {ext: bytes})) into shards of about ``shard_bytes``, after the
        shards already finished; returns every shard's record."""
        self.out.mkdir(parents=True, exist_ok=True)
        if not (self.out / PLAN).is_file():
            _atomic_json(self.out / PLAN, self.plan)
        progress = open(self.out / PROGRESS, "a", encoding="utf-8")
        shard: Optional[tarfile.TarFile] = None
        name, tmp, count = "", Path(), 0

        def close() -> None:
            nonlocal shard
            assert shard is not None
            shard.close()
            fsync_path(tmp)
            os.rename(tmp, self.out / name)
            fsync_path(self.out)
            rec = {"file": name, "samples": count, "bytes": (self.out / name).stat().st_size}
            progress.write(json.dumps(rec) + "\n")
            progress.flush()
            os.fsync(progress.fileno())
            self.done.append(rec)
            shard = None
            if on_shard is not None:
                on_shard(rec)

        try:
            for key, members in samples:
                if shard is None:
                    name = f"shard-{len(self.done):06d}.tar"
                    tmp = self.out / (name + ".tmp")
                    shard, count = tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT), 0
                for ext, data in members.items():
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size, info.mode, info.mtime = len(data), 0o444, 0
                    shard.addfile(info, io.BytesIO(data))
                count += 1
                if shard.fileobj is not None and shard.fileobj.tell() >= shard_bytes:
                    close()
            if shard is not None:
                close()
        finally:
            if shard is not None:  # stopped half way: the unfinished shard is not kept
                shard.close()
                tmp.unlink(missing_ok=True)
            progress.close()
        return self.done

    def finish(self, extra: dict) -> dict:
        manifest = {
            **self.plan,
            **extra,
            "shards": self.done,
            "samples": self.samples_done,
            "bytes": sum(r["bytes"] for r in self.done),
            "written": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }
        _atomic_json(self.out / MANIFEST, manifest)
        (self.out / PROGRESS).unlink(missing_ok=True)
        self.finished = manifest
        return manifest


def skip(items: Iterator, n: int) -> Iterator:
    for i, item in enumerate(items):
        if i >= n:
            yield item
