"""A sweep's Optuna side: its study in its storage, the sampler and pruner its file names, the
grid's points, and one axis's value for a trial."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any, Optional

from src.core.errors import ConfigError, UserError, library_message, shown
from src.run.sweep_config import SweepConfig
from src.run.sweep_trials import decoded, stored_choices


def storage_url(sweep: SweepConfig, sweep_dir: Path) -> str:
    return sweep.storage or f"sqlite:///{sweep_dir / 'study.db'}"


def sqlite_file(url: str) -> Optional[Path]:
    return Path(url[len("sqlite:///") :]) if url.startswith("sqlite:///") else None


def open_study(sweep: SweepConfig, sweep_dir: Path, create: bool, worker: int = 0):
    """The sweep's Optuna study in its storage (created when ``create``)."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    url = storage_url(sweep, sweep_dir)
    db = sqlite_file(url)
    if db is not None:
        if not create and not db.is_file():
            raise UserError(f"{db}: no study here yet (run the sweep first)")
        db.parent.mkdir(parents=True, exist_ok=True)
    kwargs = {"connect_args": {"timeout": 120}} if db is not None else {}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # heartbeat_interval is marked experimental
            storage = optuna.storages.RDBStorage(
                url,
                engine_kwargs=kwargs,
                heartbeat_interval=sweep.heartbeat_s,
                grace_period=sweep.grace_s,
            )
    except ImportError as exc:
        raise ConfigError(
            f"storage: {shown(url)} needs a database driver that is not "
            f"installed ({library_message(exc, 120)})"
        ) from None
    except Exception as exc:  # sqlalchemy: a malformed URL, a refused connection
        raise ConfigError(
            f"storage: cannot open {shown(url)}: {library_message(exc, 160)}"
        ) from None
    if not create:
        try:
            study = optuna.load_study(study_name=sweep.name, storage=storage)
        except KeyError:
            raise UserError(f"storage {shown(url)} holds no study named {sweep.name!r}") from None
    else:
        study = optuna.create_study(
            study_name=sweep.name,
            storage=storage,
            sampler=make_sampler(sweep, worker),
            pruner=make_pruner(sweep),
            direction=sweep.direction,
            load_if_exists=True,
        )
    asked = len(study.get_trials(deepcopy=False))
    if create and asked:
        study.sampler = make_sampler(sweep, worker, asked)
    if study.direction.name.lower() != sweep.direction:
        raise ConfigError(
            f"direction: the study {sweep.name!r} in {url} was created to "
            f"{study.direction.name.lower()}; name a new sweep (name=...) to "
            f"{sweep.direction}"
        )
    return study


def _options(cls, options: dict, where: str) -> dict:
    import inspect

    sig = inspect.signature(cls)
    unknown = [k for k in options if k not in sig.parameters or k in ("seed", "search_space")]
    if unknown:
        known = [k for k in sig.parameters if k not in ("seed", "search_space", "kwargs")]
        raise ConfigError(
            f"{where}.{unknown[0]}: not an option of {cls.__name__} (options: {', '.join(known)})"
        )
    return options


def make_sampler(sweep: SweepConfig, worker: int = 0, asked: int = 0):
    """The sweep's sampler for one process: seeded by the sweep's seed, the worker, and the
    trials the study already holds (a resumed sweep, or a process joining, must not propose
    again the points the first one drew from the same seed)."""
    import optuna

    seed = (sweep.seed + 7919 * worker + 104729 * asked) % 2**32
    cls = {
        "grid": optuna.samplers.RandomSampler,  # a grid's points are queued: see grid_points
        "random": optuna.samplers.RandomSampler,
        "tpe": optuna.samplers.TPESampler,
        "cmaes": optuna.samplers.CmaEsSampler,
    }[sweep.method]
    if sweep.method == "grid" and sweep.sampler:
        raise ConfigError(
            "sampler: a grid takes no sampler options (its points are the product of the axes)"
        )
    options = _options(cls, sweep.sampler, "sampler") if sweep.method != "grid" else {}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return cls(seed=seed, **options)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"sampler: {library_message(exc, 160)}") from None


def grid_points(sweep: SweepConfig) -> list[dict[str, Any]]:
    """Every point of a grid, in the order of its axes' product, as Optuna stores the values.
    The sweep queues them one by one (Optuna's GridSampler counts a failed point as visited, so
    it would never run an interrupted point again)."""
    import itertools

    keys = list(sweep.space)
    axes = [
        stored_choices(d) if d.choice is not None else d.grid(k) for k, d in sweep.space.items()
    ]
    return [dict(zip(keys, values)) for values in itertools.product(*axes)]


def point_key(params: dict[str, Any], keys) -> tuple:
    return tuple(json.dumps(params.get(k), sort_keys=True) for k in keys)


def make_pruner(sweep: SweepConfig):
    import optuna

    p = optuna.pruners
    cls = {
        "none": p.NopPruner,
        "median": p.MedianPruner,
        "percentile": p.PercentilePruner,
        "hyperband": p.HyperbandPruner,
        "successive_halving": p.SuccessiveHalvingPruner,
        "threshold": p.ThresholdPruner,
    }[sweep.pruner.type]
    options = _options(cls, dict(sweep.pruner.model_extra or {}), "pruner")
    try:
        return cls(**options)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"pruner: {library_message(exc, 160)}") from None


def check_sampler_and_pruner(sweep: SweepConfig) -> None:
    if sweep.method == "cmaes":
        try:
            import cmaes  # noqa: F401
        except ImportError:
            raise ConfigError("method: cmaes needs the cmaes package (pip install cmaes)") from None
        if any(d.choice is not None for d in sweep.space.values()):
            warnings.warn(
                "method cmaes samples choice axes at random (CMA-ES searches continuous axes only)",
                stacklevel=2,
            )
    make_sampler(sweep)
    make_pruner(sweep)


def suggest(trial, key: str, dist) -> Any:
    """The value of one axis for ``trial`` (as the experiment config reads it)."""
    if dist.choice is not None:
        picked = trial.suggest_categorical(key, stored_choices(dist))
        return decoded({key: picked}, {key: dist})[key]
    if dist.integer is not None:
        low, high = dist.integer
        return trial.suggest_int(key, low, high, step=int(dist.step or 1), log=dist.log)
    if dist.loguniform is not None:
        return trial.suggest_float(key, *dist.loguniform, log=True)
    return trial.suggest_float(key, *dist.uniform, step=dist.step)
