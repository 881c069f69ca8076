"""A run folder belongs to one config: decide whether a rerun resumes, extends or is refused.

    experiments/<name>/
        config.yaml        the current resolved config
        configs/000.yaml   every config the run went through, in order (000 = how it started)
        run_info.json      every value with its origin, data facts, derived numbers, environment

Rules when the folder holds committed checkpoints (``resume: auto``, or a path given explicitly):

- the same resolved config: resume;
- only *extend* keys differ (how long to train, how often to log, evaluate and save, how many
  checkpoints to keep, loader workers, callbacks): resume and continue under the new values;
  the change is recorded as the next ``configs/NNN.yaml``. The learning-rate schedule keeps
  the horizon the run started with (extending a finished cosine run goes on at its final rate);
- ``strategy`` changes among single, ddp and fsdp (checkpoints reshard between them): as extend;
- anything else: refused with one line listing the differing keys (old -> new) and the ways out.

Nothing here writes until :func:`write_record`, which the trainer calls once the checkpoint has
loaded: a refused or failed resume leaves the folder as it was, byte for byte.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from src.core.config import flatten
from src.core.errors import ConfigError, shown

CONFIG = "config.yaml"
HISTORY = "configs"
RUN_INFO = "run_info.json"

# Keys whose change continues the same run (dotted prefixes).
EXTEND_KEYS = (
    "trainer.max_steps",
    "trainer.max_epochs",
    "trainer.log_every",
    "trainer.eval_every_n_steps",
    "trainer.eval_every_n_epochs",
    "trainer.max_bad_steps",
    "trainer.peak_tflops",
    "checkpoint.every_n_steps",
    "checkpoint.every_n_epochs",
    "checkpoint.keep_last",
    "checkpoint.keep_every",
    "checkpoint.top_k",
    "checkpoint.save_last",
    "checkpoint.save_on_eval",
    "checkpoint.async_save",
    "checkpoint.resume",
    "logging.loggers",
    "logging.root",
    "data.num_workers",
    "data.pin_memory",
    "data.eval_batch_size",
    "data.audit",
    "callbacks",
    "slurm",  # how a cluster runs it, not what it trains
)
RESHARDING = {"single", "ddp", "fsdp"}  # strategies whose checkpoints load in one another


def differences(old: dict, new: dict) -> list[tuple[str, Any, Any]]:
    """(dotted key, old value, new value) for every leaf that differs (missing = None)."""
    a, b = flatten(old), flatten(new)
    return [(k, a.get(k), b.get(k)) for k in sorted(a.keys() | b.keys()) if a.get(k) != b.get(k)]


def _extends(key: str) -> bool:
    return any(key == k or key.startswith(k + ".") for k in EXTEND_KEYS)


@dataclass
class Decision:
    """What a start in a run folder does: ``new``, ``resume`` or ``extend``."""

    kind: str
    changes: list[tuple[str, Any, Any]] = field(default_factory=list)
    horizon: Optional[int] = None  # the schedule's total steps, kept from the run's start

    def describe(self) -> str:
        return ", ".join(f"{k} {shown(a, 40)} -> {shown(b, 40)}" for k, a, b in self.changes)


def decide(
    run_dir: Path, new: dict, has_checkpoints: bool, defaults: frozenset[str] = frozenset()
) -> Decision:
    """The decision for ``new`` (the resolved config as a dict) in ``run_dir``; reads only.

    ``defaults``: dotted keys whose new value is the platform's default; a run recorded before
    such a key existed does not differ in it.

    Raises:
        ConfigError: the folder holds another run's checkpoints and the configs differ in a key
            that changes what is trained.
    """
    if not has_checkpoints:  # (resume: never on a folder with checkpoints is refused earlier)
        return Decision("new")
    old = read_config(run_dir)
    if old is None:  # checkpoints without a record (an older layout): trust them
        return Decision("resume")
    flat_old = flatten(old)
    changes = [c for c in differences(old, new) if c[0] in flat_old or c[0] not in defaults]
    derived = read_info(run_dir).get("derived", {})
    horizon = derived.get("schedule_horizon") or derived.get("total_steps")
    if not changes:
        return Decision("resume", horizon=horizon)
    refused = [c for c in changes if not _extends(c[0]) and not _strategy_ok(c, old, new)]
    if refused:
        listed = ", ".join(f"{k} {shown(a, 40)} -> {shown(b, 40)}" for k, a, b in refused[:6])
        more = f" (and {len(refused) - 6} more)" if len(refused) > 6 else ""
        raise ConfigError(
            f"{run_dir}: holds checkpoints of a run with another config: {listed}{more}; "
            f"to train this config, give it its own folder with name=<new name> or --new-run "
            f"(or delete {run_dir})"
        )
    return Decision("extend", changes, horizon)


def _strategy_ok(change: tuple[str, Any, Any], old: dict, new: dict) -> bool:
    """A strategy change is fine when both strategies read each other's checkpoints."""
    if not change[0].startswith("strategy."):
        return False
    a, b = old.get("strategy", {}).get("type"), new.get("strategy", {}).get("type")
    return a in RESHARDING and b in RESHARDING


def read_config(run_dir: Path) -> Optional[dict]:
    import yaml

    try:
        return yaml.safe_load((run_dir / CONFIG).read_text())
    except (OSError, yaml.YAMLError):
        return None


def read_info(run_dir: Path) -> dict:
    try:
        return json.loads((run_dir / RUN_INFO).read_text())
    except (OSError, ValueError):
        return {}


def write_record(run_dir: Path, resolved: str, run_info: dict, decision: Decision) -> None:
    """Write the run's record for ``decision`` (main process, after a successful load).

    ``resume`` leaves the record as it is; ``new`` and ``extend`` write ``config.yaml``, the next
    ``configs/NNN.yaml`` and ``run_info.json`` (each by an atomic rename).
    """
    if decision.kind == "resume" and (run_dir / CONFIG).is_file():
        return
    history = run_dir / HISTORY
    history.mkdir(parents=True, exist_ok=True)
    n = len([p for p in history.glob("[0-9][0-9][0-9].yaml")])
    if n == 0 and decision.kind != "new" and (run_dir / CONFIG).is_file():
        _atomic(history / "000.yaml", (run_dir / CONFIG).read_text())  # the record before history
        n = 1
    _atomic(history / f"{n:03d}.yaml", resolved)
    _atomic(run_dir / CONFIG, resolved)
    if decision.changes:
        run_info = {
            **run_info,
            "changes": [{"key": k, "old": a, "new": b} for k, a, b in decision.changes],
        }
    _atomic(run_dir / RUN_INFO, json.dumps(run_info, indent=1, default=str))


def _atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def free_name(root: Path, name: str) -> str:
    """``name`` if its folder is free, else the first free ``name-2``, ``name-3``, ..."""
    if not (root / name).exists():
        return name
    k = 2
    while (root / f"{name}-{k}").exists():
        k += 1
    return f"{name}-{k}"
