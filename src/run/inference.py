"""A trained run, loaded for use: the task its config builds, with a committed checkpoint's weights.

    run = load_run(run="experiments/exp001")                    # its latest committed checkpoint
    run = load_run(checkpoint="experiments/exp001/checkpoints/latest")
    run.task.inference().module(x)                              # what predict and export use

The checkpoint may come from any strategy (one file, DCP shards, DeepSpeed): its weights are
consolidated into one process's model. Its pickles are checked before anything reads them.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from src.core.errors import CheckpointError, UserError
from src.distributed.weights import load_consolidated

CONFIG_FILE = "config.yaml"


@dataclass
class LoadedRun:
    """A run's config, checkpoint, data and task (weights loaded, eval mode, on the CPU)."""

    cfg: Any
    run_dir: Optional[Path]
    checkpoint: Path
    step: int
    data: Any
    task: Any

    def provenance(self) -> dict[str, Any]:
        """What an exported file or a predictions file says it came from."""
        return {
            "run": str(self.run_dir) if self.run_dir else None,
            "checkpoint": str(self.checkpoint),
            "step": self.step,
            "name": self.cfg.name,
            "task": self.cfg.task["type"],
            "model": self.cfg.model,
        }


@contextlib.contextmanager
def atomic_path(out: Path) -> Iterator[Path]:
    """A temporary path beside ``out`` to write; on success it becomes ``out`` (readable by
    others as the umask allows, like any file the user writes), on failure it is removed and
    ``out`` is untouched."""
    out = Path(out)
    if out.is_dir() and out.suffix:
        raise UserError(f"--out: {out} is a folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    try:
        yield tmp
        umask = os.umask(0)
        os.umask(umask)
        for p in [tmp] + list(tmp.rglob("*")) if tmp.is_dir() else [tmp]:
            os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~umask)
        if tmp.is_dir() and out.exists():
            old = out.with_name(f".{out.name}.old{os.getpid()}")
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp.exists():
            tmp.unlink()


def positional_run(args, prog: str) -> Optional[str]:
    """``RUN`` given as the first positional argument (not an override) stands for ``--run``."""
    if args.overrides and "=" not in args.overrides[0]:
        if args.run is not None:
            raise UserError(
                f"{prog}: {args.overrides[0]!r}: the run is given twice (--run "
                f"{args.run}); overrides are key.path=value"
            )
        return args.overrides.pop(0)
    return args.run


def run_folder_of(checkpoint: Path) -> Optional[Path]:
    """The run folder a ``<run>/checkpoints/step_<N>`` folder belongs to (None if not in one)."""
    run = checkpoint.resolve().parent.parent
    return run if (run / CONFIG_FILE).is_file() else None


def locate(
    run: Optional[str], checkpoint: Optional[str], config: Optional[str] = None
) -> tuple[Path, Optional[Path], Optional[Path]]:
    """(checkpoint step folder, run folder, config file) from what the user named: ``--run``,
    ``--checkpoint`` (a step folder, ``checkpoints/``, ``checkpoints/latest``) or both."""
    from src.core.checkpoint import find_checkpoint

    run_dir: Optional[Path] = None
    if run is not None:
        run_dir = Path(run)
        if not run_dir.is_dir():
            import difflib

            parent = run_dir.parent if run_dir.parent.is_dir() else None
            near = (
                difflib.get_close_matches(
                    run_dir.name,
                    [p.name for p in parent.iterdir() if (p / CONFIG_FILE).is_file()],
                    n=1,
                )
                if parent
                else []
            )
            hint = f"; did you mean {parent / near[0]}?" if parent and near else ""
            raise UserError(f"--run: {run_dir}: no such run folder{hint}")
        if not (run_dir / CONFIG_FILE).is_file():
            raise UserError(
                f"--run: {run_dir}: not a run folder (no {CONFIG_FILE}); give the "
                "folder training wrote, experiments/<name>"
            )
    if checkpoint is not None:
        where = Path(checkpoint)
    elif run_dir is not None:
        where = run_dir
    else:
        raise UserError("give --run RUN_FOLDER (or --checkpoint STEP_FOLDER)")
    try:
        step_dir = find_checkpoint(where)
    except CheckpointError as exc:
        flag = "--checkpoint" if checkpoint is not None else "--run"
        raise CheckpointError(f"{flag}: {exc}") from None
    if run_dir is None:
        run_dir = run_folder_of(step_dir)
    config_file = Path(config) if config else (run_dir / CONFIG_FILE if run_dir else None)
    if config_file is not None and not config_file.is_file():
        raise UserError(f"--config: {config_file}: no such file")
    return step_dir, run_dir, config_file


def load_run(
    run: Optional[str] = None,
    checkpoint: Optional[str] = None,
    config: Optional[str] = None,
    overrides: Sequence[str] = (),
    trust_pickles: bool = False,
) -> LoadedRun:
    """Build the run's task from its config (``overrides`` applied, e.g. another data section)
    and load the checkpoint's weights into it."""
    from src.core.checkpoint import step_of
    from src.core.console import held_output
    from src.core.seeding import seed_everything
    from src.distributed.base import check_shapes, fill_tied
    from src.run.experiment import build_task, prepare

    step_dir, run_dir, config_file = locate(run, checkpoint, config)
    if config_file is None:
        raise UserError(
            f"--checkpoint: {step_dir} is not inside a run folder with a "
            f"{CONFIG_FILE}; give the run's config with --config"
        )
    held = held_output()  # what libraries print while building: kept only with a traceback
    outcome = "drop"
    try:
        cfg, _ = prepare(str(config_file), list(overrides))
        seed_everything(cfg.seed)
        data, _, task = build_task(cfg, run_dir)
    except UserError:
        raise
    except BaseException:
        outcome = "console"
        raise
    finally:
        held.release(outcome)
    state = load_consolidated(step_dir, trust_pickles or cfg.checkpoint.trust_pickles)
    fill_tied(task, state)
    check_shapes(task, state, step_dir)
    task.load_state_dict(state)
    task.eval()
    return LoadedRun(cfg, run_dir, step_dir, step_of(step_dir), data, task)
