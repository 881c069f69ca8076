"""CheckpointManager: step directories, a commit marker written last, an atomic ``latest``, rotation
and resume of the newest committed checkpoint.

Layout of ``experiments/<name>/checkpoints/``::

    step_00000100/
        model.safetensors  optimizer.pt  trainer.pt  rank_00000.pt   (written by the strategy:
        dcp/               sharded model and optimizer (fsdp, async saves)      single and ddp
        deepspeed/         DeepSpeed's own shards (deepspeed)                   write the first line)
        meta.json          step, epoch, world size, config hash, time, metrics
        COMMIT             written last, after everything above is fsync'ed
    latest                 "step_00000100", replaced by rename only after the commit

A directory without ``COMMIT`` is an interrupted save: resume ignores it and rotation removes it.
A save that fails (a full disk, any OS error) on any rank is abandoned alike by every rank: its
folder is removed, ``latest`` keeps naming the last committed checkpoint, and a
:class:`CheckpointSaveError` says which path failed and how much space there is (exit 75).
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional

from src.core.config import CheckpointConfig
from src.core.errors import (
    CheckpointError,
    CheckpointMismatchError,
    CheckpointSaveError,
    ConfigError,
    library_message,
)
from src.core.pickle_guard import UnsafeCheckpointError, verify_checkpoint

# Every name in a checkpoint folder, in one place (the strategies write the files, this module
# owns everything around them).
COMMIT = "COMMIT"
META = "meta.json"
LATEST = "latest"
PREFIX = "step_"
MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.pt"
TRAINER_FILE = "trainer.pt"
DCP_DIR = "dcp"
DEEPSPEED_DIR = "deepspeed"


def rank_file(rank: int) -> str:
    """Per-rank state (RNG) lives in its own file."""
    return f"rank_{rank:05d}.pt"


def fsync_path(path: Path) -> None:
    """Flush a file (or a folder's entries) to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_durably(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


# The errors of storage a checkpoint write can meet: no space, a quota, a file-size limit, a
# failing disk, a read-only or forbidden folder. They are the disk's, not the program's.
STORAGE_ERRNOS = frozenset(
    {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EIO, errno.EROFS, errno.EACCES}
)
# torch's zip writer (torch.save, DeepSpeed) raises a C++ RuntimeError that carries no errno
_TORCH_WRITER = re.compile(
    r"PytorchStreamWriter failed writing|unexpected pos \d+ vs \d+|"
    r"file write failed"
)
_MAX_CAUSES = 8


def storage_failure(exc: Optional[BaseException]) -> Optional[BaseException]:
    """The storage error behind ``exc`` (see :data:`STORAGE_ERRNOS`), or None when ``exc`` is
    not the disk refusing a write but a program error.

    Judged by type and errno: an OSError with a storage errno; the libraries' own errors that
    wrap one (safetensors' I/O error, DCP's per-rank ``CheckpointException`` whose every
    failure is one, torch's zip writer); or an exception raised from (``__cause__``) one. Any
    other exception, whatever its message says, is a program error and keeps its traceback.
    """
    for _ in range(_MAX_CAUSES):
        if exc is None:
            return None
        if isinstance(exc, OSError):
            return exc if exc.errno in STORAGE_ERRNOS else None
        kind = type(exc).__name__
        if kind == "SafetensorError":  # "I/O error: No space left on device (os error 28)"
            code = re.search(r"\(os error (\d+)\)", str(exc))
            return exc if code is not None and int(code.group(1)) in STORAGE_ERRNOS else None
        if kind == "CheckpointException":  # DCP: {rank: (exception, traceback)}
            found = [storage_failure(f[0]) for f in (getattr(exc, "failures", None) or {}).values()]
            return found[0] if found and all(found) else None
        if type(exc) is RuntimeError and _TORCH_WRITER.search(str(exc)):
            return exc
        exc = exc.__cause__
    return None


def is_write_failure(exc: Optional[BaseException]) -> bool:
    return storage_failure(exc) is not None


def folder_size(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def _mb(n: float) -> str:
    return f"{n / 2**20:,.1f} MB"


def step_of(path: Path) -> int:
    return int(path.name[len(PREFIX) :])


def is_committed(path: Path) -> bool:
    return (path / COMMIT).is_file()


def find_checkpoint(path: Path) -> Path:
    """A committed ``step_<N>`` folder from what a user points at: the step folder itself, a
    run's ``checkpoints/`` folder, its ``latest`` pointer or the run folder (then its latest
    committed checkpoint)."""
    path = Path(path)
    if path.name == LATEST and path.is_file():  # checkpoints/latest: the step it names
        path = path.parent / path.read_text().strip()
        if not path.is_dir():
            raise CheckpointError(
                f"{path.parent / LATEST}: names {path.name}, which does not exist"
            )
    if not path.exists():
        raise CheckpointError(f"{path}: no such checkpoint or run folder")
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a directory")
    if (path / "checkpoints").is_dir():
        path = path / "checkpoints"
    if is_committed(path) or not any(p.name.startswith(PREFIX) for p in path.iterdir()):
        if not is_committed(path):
            raise CheckpointError(f"{path}: not a committed checkpoint (no {COMMIT} marker)")
        return path
    latest = path / LATEST
    if latest.is_file() and is_committed(path / latest.read_text().strip()):
        return path / latest.read_text().strip()
    done = sorted(
        (
            p
            for p in path.iterdir()
            if p.name.startswith(PREFIX) and p.name[len(PREFIX) :].isdigit() and is_committed(p)
        ),
        key=step_of,
    )
    if not done:
        raise CheckpointError(f"{path}: holds no committed checkpoint")
    return done[-1]


class CheckpointManager:
    """Saves, rotates and finds checkpoints of one run; the strategy writes the files inside.

    Args:
        cfg: the ``checkpoint`` config section.
        directory: ``experiments/<name>/checkpoints``.
        strategy: writes and reads the shards; decides who is main.
        config_hash: hash of the resolved config, recorded in ``meta.json``.
    """

    def __init__(self, cfg: CheckpointConfig, directory: Path, strategy, config_hash: str = ""):
        self.cfg, self.dir, self.strategy, self.config_hash = (
            cfg,
            Path(directory),
            strategy,
            config_hash,
        )
        # top-k selection; the model_checkpoint callback may set these too
        self.top_k, self.monitor, self.mode = cfg.top_k, cfg.monitor, cfg.mode
        self.save_on_eval = cfg.save_on_eval or bool(cfg.top_k and cfg.monitor)
        # (BackgroundSave, path, meta) of a write not yet committed
        self._pending: Optional[tuple[Any, Path, dict[str, Any]]] = None
        self._last_size = 0  # bytes of the last committed checkpoint (main process)
        self._warned_space = False

    # ------------------------------------------------------------------ listing

    def all_dirs(self) -> list[Path]:
        if not self.dir.is_dir():
            return []
        dirs = [
            p
            for p in self.dir.iterdir()
            if p.is_dir() and p.name.startswith(PREFIX) and p.name[len(PREFIX) :].isdigit()
        ]
        return sorted(dirs, key=step_of)

    def committed(self) -> list[Path]:
        return [p for p in self.all_dirs() if is_committed(p)]

    # ------------------------------------------------------------------ saving

    def save(
        self,
        step: int,
        epoch: int,
        model,
        optimizer,
        trainer_state: dict[str, Any],
        rank_state: dict[str, Any],
        metrics: Optional[dict[str, float]] = None,
        extra_files: Optional[Callable[[Path], None]] = None,
    ) -> Path:
        """Write ``step_<N>/`` through the strategy, commit it, point ``latest`` at it, rotate.

        Raises:
            CheckpointSaveError: the write failed on some rank (every rank raises it; the
                partial folder is gone, ``latest`` unchanged).
        """
        self.wait()  # a previous background write commits first
        path = self.dir / f"{PREFIX}{step:08d}"
        s = self.strategy
        failure: Optional[BaseException] = None
        if s.is_main:
            self._warn_if_short_of_space()
            try:
                if path.exists():  # an interrupted or repeated save of this step
                    shutil.rmtree(path)
                path.mkdir(parents=True)
            except OSError as exc:
                failure = exc
        s.barrier()
        meta = {
            "step": step,
            "epoch": epoch,
            "world_size": s.world_size,
            "strategy": type(s).__name__,
            "config_hash": self.config_hash,
            "time": time.time(),
            "metrics": metrics or {},
        }
        future = None
        if failure is None:
            try:
                future = s.save(
                    path,
                    model,
                    optimizer,
                    trainer_state,
                    rank_state,
                    async_save=self.cfg.async_save,
                )
                if extra_files is not None and s.is_main:
                    extra_files(path)
            except Exception as exc:
                failure = exc
        if future is not None:
            self._settle(failure, path)  # a failure to start the background write
            self._pending = (future, path, meta)
        else:
            self._settle(failure, path)
            self._commit(path, meta)
        return path

    def before_update(self) -> None:
        """Called before the weights change: a background save must have copied them by now."""
        if self._pending is not None:
            self._pending[0].wait_staged()

    def wait(self) -> None:
        """Finish a background write, then commit it (every rank calls this at the same point).
        A failed background write is reported here, on the training thread, by every rank."""
        pending, self._pending = self._pending, None
        if pending is not None:
            future, path, meta = pending
            failure = None
            try:
                future.result()
            except Exception as exc:
                failure = exc
            self._settle(failure, path)
            self._commit(path, meta)

    def _settle(self, failure: Optional[BaseException], path: Path) -> None:
        """Agree across ranks whether the write at ``path`` failed; if it did anywhere, the main
        process removes the folder and every rank raises (a program error keeps its traceback)."""
        import torch

        s = self.strategy
        flag = torch.tensor(
            0.0 if failure is None else 1.0 if is_write_failure(failure) else 2.0, device=s.device
        )
        worst = int(s.reduce({"failed": flag}, op="max")["failed"].item())
        if worst == 0:
            return
        if s.is_main:
            shutil.rmtree(path, ignore_errors=True)
        if worst == 2 and failure is not None and not is_write_failure(failure):
            raise failure
        error = self._save_error(path, failure)
        error.every_rank = worst == 1  # no rank raised a program error instead
        raise error

    def _save_error(self, path: Path, failure: Optional[BaseException]) -> CheckpointSaveError:
        failure = storage_failure(failure)
        if failure is None:
            cause = "another rank failed to write its part"
        elif isinstance(failure, OSError):
            cause = f"{failure.strerror or type(failure).__name__}" + (
                f" ({failure.filename})" if failure.filename else ""
            )
        else:  # torch's zip writer says only "unexpected pos ..."
            cause = f"write failed ({library_message(failure, 120)})"
        free = shutil.disk_usage(self.dir).free if self.dir.exists() else 0
        size = self._checkpoint_size()
        needed = f"a checkpoint takes {_mb(size)}, " if size else ""
        latest = self.latest()
        resume = (
            f"the run resumes from {latest.name}"
            if latest is not None
            else "no earlier checkpoint: the run starts afresh"
        )
        return CheckpointSaveError(
            f"{path}: checkpoint not saved: {cause}; {needed}{_mb(free)} free on {self.dir}; "
            f"the partial folder is removed and {resume} when this command runs again"
        )

    def _warn_if_short_of_space(self) -> None:
        """Warn once when the disk holds less than two more checkpoints of the last one's size
        (a save writes the new one before rotation removes an old one)."""
        size = 0 if self._warned_space else self._checkpoint_size()
        if not size:
            return
        free = shutil.disk_usage(self.dir).free
        if free < 2 * size:
            self._warned_space = True
            warnings.warn(
                f"{self.dir}: {_mb(free)} free, a checkpoint takes {_mb(size)}: the "
                "next saves may fail",
                stacklevel=3,
            )

    def _checkpoint_size(self) -> int:
        """Bytes of the last committed checkpoint (measured once after a resume)."""
        if not self._last_size:
            latest = self.latest()
            self._last_size = folder_size(latest) if latest is not None else 0
        return self._last_size

    def _commit(self, path: Path, meta: dict[str, Any]) -> None:
        s = self.strategy
        s.barrier()
        failure = None
        if s.is_main:
            try:
                _write_durably(path / META, json.dumps(meta, indent=1))
                for f in path.rglob("*"):
                    if f.is_file():
                        fsync_path(f)
                _write_durably(path / COMMIT, str(meta["step"]))
                fsync_path(path)
            except OSError as exc:
                failure = exc
        self._settle(failure, path)  # every rank waits here, as at a barrier
        if s.is_main:
            self._last_size = folder_size(path)
            try:
                _write_durably(self.dir / LATEST, path.name)
            except OSError:  # the commit stands: latest() falls back to the newest committed
                (self.dir / (LATEST + ".tmp")).unlink(missing_ok=True)
            self.rotate()
        s.barrier()

    def rotate(self) -> None:
        """Delete what no rule keeps: keep_last, keep_every, top_k by monitor, and ``latest``."""
        cfg = self.cfg
        done = self.committed()
        keep = set(done[-cfg.keep_last :] if cfg.keep_last else done)
        if cfg.keep_every:
            keep |= {p for p in done if step_of(p) % cfg.keep_every == 0}
        if self.top_k and self.monitor:
            keep |= set(self.ranked()[: self.top_k])
        latest = self.latest()
        if latest is not None:
            keep.add(latest)
        for p in self.all_dirs():
            if p not in keep:
                shutil.rmtree(p, ignore_errors=True)

    # ------------------------------------------------------------------ reading

    def ranked(self) -> list[Path]:
        """Committed checkpoints that recorded ``monitor``, best first."""
        scored = [(self.meta(p)["metrics"].get(self.monitor), p) for p in self.committed()]
        scored = [(v, p) for v, p in scored if v is not None]
        scored.sort(key=lambda vp: vp[0], reverse=self.mode == "max")
        return [p for _, p in scored]

    def best(self) -> Optional[Path]:
        ranked = self.ranked() if self.monitor else []
        return ranked[0] if ranked else None

    def meta(self, path: Path) -> dict[str, Any]:
        try:
            return json.loads((path / META).read_text())
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"{path / META}: unreadable ({exc})") from None

    def latest(self) -> Optional[Path]:
        f = self.dir / LATEST
        if f.is_file():
            p = self.dir / f.read_text().strip()
            if is_committed(p):
                return p
        done = self.committed()
        return done[-1] if done else None

    def candidates(self) -> list[Path]:
        """Checkpoints to resume from, best first (empty when resume is ``never``)."""
        resume = self.cfg.resume
        if resume == "never":
            return []
        if resume == "auto":
            return list(reversed(self.committed()))
        path = Path(resume)
        if not path.is_dir():
            raise ConfigError(f"checkpoint.resume: not a directory: {resume}")
        if not is_committed(path):
            raise CheckpointError(f"{path}: not a committed checkpoint (no {COMMIT} marker)")
        return [path]

    def load(self, model, optimizer) -> Optional[tuple[Path, dict, dict]]:
        """Restore the newest readable checkpoint into model and optimizer.

        Every pickle in the folder is checked first (:func:`verify_checkpoint`): a file that
        would run code stops the run, whatever ``resume`` says. With ``resume: auto`` a corrupt
        checkpoint is skipped with a warning and the previous committed one is tried; with an
        explicit path, the error is raised.

        Returns:
            (path, trainer_state, rank_state), or None when there is nothing to resume.
        """
        candidates = self.candidates()
        for path in candidates:
            try:
                verify_checkpoint(path, trust=self.cfg.trust_pickles)
                trainer_state, rank_state = self.strategy.load(path, model, optimizer)
                return path, trainer_state, rank_state
            except (CheckpointMismatchError, UnsafeCheckpointError):
                raise
            except CheckpointError as exc:
                if self.cfg.resume != "auto":
                    raise
                warnings.warn(f"skipping checkpoint: {exc}; trying the previous one", stacklevel=2)
        if candidates:
            raise CheckpointError(
                f"{self.dir}: no committed checkpoint could be read; "
                "set checkpoint.resume=never to start afresh"
            )
        return None

    def clean_uncommitted(self) -> None:
        """Remove directories left by interrupted saves (main process only)."""
        if self.strategy.is_main:
            for p in self.all_dirs():
                if not is_committed(p):
                    shutil.rmtree(p, ignore_errors=True)
