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
"""
from __future__ import annotations

import json
import os
import shutil
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Optional

from src.core.config import CheckpointConfig
from src.core.errors import CheckpointError, CheckpointMismatchError, ConfigError
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


def _fsync(path: Path) -> None:
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


def step_of(path: Path) -> int:
    return int(path.name[len(PREFIX):])


def is_committed(path: Path) -> bool:
    return (path / COMMIT).is_file()


def find_checkpoint(path: Path) -> Path:
    """A committed ``step_<N>`` folder from what a user points at: the step folder itself, a
    run's ``checkpoints/`` folder or the run folder (then its latest committed checkpoint)."""
    path = Path(path)
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
    done = sorted((p for p in path.iterdir() if p.name.startswith(PREFIX)
                   and p.name[len(PREFIX):].isdigit() and is_committed(p)), key=step_of)
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
        self.cfg, self.dir, self.strategy, self.config_hash = cfg, Path(directory), strategy, config_hash
        # top-k selection; the model_checkpoint callback may set these too
        self.top_k, self.monitor, self.mode = cfg.top_k, cfg.monitor, cfg.mode
        self.save_on_eval = cfg.save_on_eval or bool(cfg.top_k and cfg.monitor)
        self._pending = None  # (BackgroundSave, path, meta) of a write not yet committed

    # ------------------------------------------------------------------ listing

    def all_dirs(self) -> list[Path]:
        if not self.dir.is_dir():
            return []
        dirs = [p for p in self.dir.iterdir() if p.is_dir() and p.name.startswith(PREFIX)
                and p.name[len(PREFIX):].isdigit()]
        return sorted(dirs, key=step_of)

    def committed(self) -> list[Path]:
        return [p for p in self.all_dirs() if is_committed(p)]

    # ------------------------------------------------------------------ saving

    def save(self, step: int, epoch: int, model, optimizer, trainer_state: dict[str, Any],
             rank_state: dict[str, Any], metrics: Optional[dict[str, float]] = None,
             extra_files: Optional[Callable[[Path], None]] = None) -> Path:
        """Write ``step_<N>/`` through the strategy, commit it, point ``latest`` at it, rotate."""
        self.wait()  # a previous background write commits first
        path = self.dir / f"{PREFIX}{step:08d}"
        s = self.strategy
        if s.is_main:
            if path.exists():  # an interrupted or repeated save of this step
                shutil.rmtree(path)
            path.mkdir(parents=True)
        s.barrier()
        meta = {"step": step, "epoch": epoch, "world_size": s.world_size,
                "strategy": type(s).__name__, "config_hash": self.config_hash,
                "time": time.time(), "metrics": metrics or {}}
        future = s.save(path, model, optimizer, trainer_state, rank_state,
                         async_save=self.cfg.async_save)
        if extra_files is not None and s.is_main:
            extra_files(path)
        if future is not None:
            self._pending = (future, path, meta)
        else:
            self._commit(path, meta)
        return path

    def before_update(self) -> None:
        """Called before the weights change: a background save must have copied them by now."""
        if self._pending is not None:
            self._pending[0].wait_staged()

    def wait(self) -> None:
        """Finish a background write, then commit it (every rank calls this at the same point)."""
        pending, self._pending = self._pending, None
        if pending is not None:
            future, path, meta = pending
            future.result()
            self._commit(path, meta)

    def _commit(self, path: Path, meta: dict[str, Any]) -> None:
        s = self.strategy
        s.barrier()
        if s.is_main:
            _write_durably(path / META, json.dumps(meta, indent=1))
            for f in path.rglob("*"):
                if f.is_file():
                    _fsync(f)
            _write_durably(path / COMMIT, str(meta["step"]))
            _fsync(path)
            _write_durably(self.dir / LATEST, path.name)
            self.rotate()
        s.barrier()

    def rotate(self) -> None:
        """Delete what no rule keeps: keep_last, keep_every, top_k by monitor, and ``latest``."""
        cfg = self.cfg
        done = self.committed()
        keep = set(done[-cfg.keep_last:] if cfg.keep_last else done)
        if cfg.keep_every:
            keep |= {p for p in done if step_of(p) % cfg.keep_every == 0}
        if self.top_k and self.monitor:
            keep |= set(self.ranked()[:self.top_k])
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
            raise CheckpointError(f"{self.dir}: no committed checkpoint could be read; "
                                  "set checkpoint.resume=never to start afresh")
        return None

    def clean_uncommitted(self) -> None:
        """Remove directories left by interrupted saves (main process only)."""
        if self.strategy.is_main:
            for p in self.all_dirs():
                if not is_committed(p):
                    shutil.rmtree(p, ignore_errors=True)
