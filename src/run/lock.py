"""One writer per run folder: rank 0 holds ``<run>/.lock`` (an advisory ``flock``) for the run's life.

A second run on the same folder is refused at once, naming the owner, before it reads or writes
anything there; otherwise it would resume from the first one's checkpoints while the first still
trains, and both would append to ``metrics.jsonl`` and rotate each other's checkpoints. The kernel
drops the lock when its process dies (even by ``kill -9``), so a killed run's folder is free again
at once; the file it leaves only names the dead owner, and the next run says it took over. A
process forked by the run (a DataLoader worker) closes its copy of the lock at once: a worker that
outlives a killed run by a few seconds never holds the folder.

On a filesystem shared by several hosts the lock holds where the filesystem supports ``flock``
across clients (NFSv4, Lustre with ``flock`` mounted, GPFS); where it does not, two hosts can
still write one run folder: give each job its own ``name``.
"""

from __future__ import annotations

import contextlib
import os
import socket
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Optional

from src.core.errors import ConfigError

LOCK_FILE = ".lock"
_HELD: list[IO[str]] = []  # this process's locks, closed in every child it forks


def _close_in_child() -> None:
    """In a forked child: drop the inherited descriptors of the parent's locks (the parent keeps
    the lock; it goes when the parent's own descriptor closes, even if this child lives on)."""
    for f in _HELD:
        with contextlib.suppress(OSError, ValueError):
            null = os.open(os.devnull, os.O_RDONLY)
            os.dup2(null, f.fileno())  # the number stays valid (the file object closes it later)
            os.close(null)
    _HELD.clear()


os.register_at_fork(after_in_child=_close_in_child)


def _owner() -> str:
    return f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}"


class RunLock:
    """The run folder's lock, taken by ``acquire`` (which refuses a busy folder) and given back by
    ``release``. Only the main process takes it."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / LOCK_FILE
        self._file: Optional[IO[str]] = None

    def busy(self) -> Optional[str]:
        """Who holds the folder now (None: free, and from now on this process holds it)."""
        import fcntl

        folder = self.path.parent
        created = [d for d in (folder, *folder.parents) if not d.exists()]  # removed if left empty
        folder.mkdir(parents=True, exist_ok=True)
        f = open(self.path, "a+", encoding="utf-8")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.seek(0)
            owner = f.read().strip() or "another process"
            f.close()
            return owner
        f.seek(0)
        previous = f.read().strip()
        if previous:  # the lock was free: its last owner stopped without releasing it
            warnings.warn(
                f"{self.path.parent}: the run that held this folder ({previous}) is no "
                "longer running; taking it over",
                stacklevel=2,
            )
        f.seek(0)
        f.truncate()
        f.write(_owner() + "\n")
        f.flush()
        self._file, self._created = f, created
        _HELD.append(f)
        return None

    def release(self) -> None:
        if self._file is None:
            return
        import fcntl

        with contextlib.suppress(OSError):
            self.path.unlink()  # before unlocking: a waiting run never sees a stale owner
        fcntl.flock(self._file, fcntl.LOCK_UN)
        if self._file in _HELD:
            _HELD.remove(self._file)
        self._file.close()
        self._file = None
        for d in self._created:  # a run that stopped before writing leaves no empty folders
            try:
                d.rmdir()
            except OSError:
                break


@contextlib.contextmanager
def run_folder_lock(run_dir: Path, strategy) -> Iterator[None]:
    """Hold ``run_dir``'s lock on the main process for the block; every rank learns whether the
    folder was busy (one all-reduce) and refuses alike with one line."""
    import torch

    lock = RunLock(run_dir) if strategy.is_main else None
    owner = lock.busy() if lock is not None else None
    if strategy.world_size > 1:
        flag = torch.tensor(float(owner is not None), device=strategy.device)
        owner = owner or ("another run" if float(strategy.reduce({"busy": flag})["busy"]) else None)
    if owner is not None:
        raise ConfigError(
            f"{run_dir}: in use by {owner}; a second run would interleave its "
            "checkpoints and metrics with it. Wait for it to finish, or start a "
            "separate run with --new-run or another name"
        )
    try:
        yield
    finally:
        if lock is not None:
            lock.release()
