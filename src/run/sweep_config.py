"""A sweep file: a base experiment, a metric, a search space over its dotted keys, a budget.

    name: sweep_exp001
    experiment: exp001.yaml          # (or base:) relative to this file
    metric: val/accuracy
    direction: maximize
    method: tpe                      # grid | random | tpe | cmaes
    trials: 24                       # grid: at most the product of its axes (the default)
    pruner: {type: hyperband}        # none | median | percentile | hyperband | successive_halving
                                     # | threshold; other keys are the Optuna pruner's options
    overrides: [trainer.max_epochs=10]   # fixed for every trial
    space:
      optimizer.lr: {loguniform: [1.0e-4, 1.0e-1]}
      model.dropout: {uniform: [0.0, 0.5]}
      data.batch_size: {choice: [32, 64, 128]}
      model.channels: {choice: [[16, 32], [32, 64]]}

Distributions: ``uniform`` / ``loguniform`` ``[low, high]`` (floats, ``step`` for a grid),
``int`` ``[low, high]`` (``step``, ``log``), ``choice`` ``[values]`` (any YAML values).

The space is checked before any trial runs: each bound and each choice is applied to the
experiment config and validated exactly as a run validates its config, so an unknown key or a
value a component refuses is one line naming the space entry.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal, Optional

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, ValidationError, field_validator

from src.core.errors import ConfigError, shown

METHODS = ("grid", "random", "tpe", "cmaes")
KINDS = ("uniform", "loguniform", "int", "choice")
MAX_GRID = 100_000


class Dist(BaseModel):
    """One axis of the space: exactly one of the kinds, with its options."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, populate_by_name=True)
    uniform: Optional[list[float]] = None
    loguniform: Optional[list[float]] = None
    integer: Optional[list[float]] = Field(None, alias="int")
    choice: Optional[list[Any]] = None
    step: Optional[float] = Field(None, gt=0)
    log: bool = False

    def values(self, kind: str) -> Optional[list[Any]]:
        return getattr(self, "integer" if kind == "int" else kind)

    @property
    def kind(self) -> str:
        return next(k for k in KINDS if self.values(k) is not None)

    def check(self, key: str) -> None:
        at = f"space.{key}"
        given = [k for k in KINDS if self.values(k) is not None]
        if len(given) != 1:
            raise ConfigError(
                f"{at}: give exactly one of {', '.join(KINDS)} (got {', '.join(given) or 'none'})"
            )
        kind = given[0]
        values = self.values(kind) or []
        if kind == "choice":
            if not values:
                raise ConfigError(f"{at}: choice: the list is empty")
            if self.step is not None or self.log:
                raise ConfigError(f"{at}: step and log apply to ranges, not to choice")
            if len({json.dumps(v, sort_keys=True) for v in values}) != len(values):
                raise ConfigError(f"{at}: choice: {shown(values)} repeats a value")
            return
        if len(values) != 2:
            raise ConfigError(f"{at}: {kind}: expected [low, high], got {shown(values)}")
        low, high = values
        if kind == "int":
            if any(float(v) != int(v) for v in values):
                raise ConfigError(f"{at}: int: bounds must be whole numbers, got {shown(values)}")
            self.integer = [int(low), int(high)]
            low, high = self.integer
            if self.step is not None and float(self.step) != int(self.step):
                raise ConfigError(f"{at}: step: an int range needs a whole step")
        if not low < high:
            raise ConfigError(f"{at}: {kind}: low {low!r} must be below high {high!r}")
        if (kind == "loguniform" or self.log) and low <= 0:
            raise ConfigError(f"{at}: {kind}: a log scale needs low > 0, got {low!r}")
        if kind == "loguniform" and self.step is not None:
            raise ConfigError(f"{at}: step does not apply to loguniform")
        if kind == "uniform" and self.log:
            raise ConfigError(f"{at}: log: use loguniform for a float log scale")
        if self.log and self.step not in (None, 1):
            raise ConfigError(f"{at}: an int range on a log scale takes no step")

    def bounds(self) -> list[Any]:
        """The values the space check applies: both ends of a range, every choice."""
        if self.choice is not None:
            return list(self.choice)
        return list(self.values(self.kind) or [])

    def grid(self, key: str) -> list[Any]:
        """The axis of a grid: the choices, or a range walked by its step."""
        if self.choice is not None:
            return list(self.choice)
        if self.integer is not None:
            first, last = (int(v) for v in self.integer)  # whole numbers: check() saw to it
            return list(range(first, last + 1, int(self.step or 1)))
        if self.uniform is not None and self.step is not None:
            low, high = self.uniform
            n = int(math.floor((high - low) / self.step + 1e-9))
            return [round(low + i * self.step, 12) for i in range(n + 1)]
        raise ConfigError(
            f"space.{key}: method grid needs finite axes: a choice, an int range "
            f"or a uniform range with a step (got {self.kind})"
        )


class PrunerConfig(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: Literal[
        "none", "median", "percentile", "hyperband", "successive_halving", "threshold"
    ] = "none"


class SweepConfig(BaseModel):
    """A sweep; see the module docstring."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, populate_by_name=True)
    name: str = Field(..., min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_][\w.\-]*$")
    experiment: str = Field(
        ...,
        min_length=1,
        validation_alias=AliasChoices("experiment", "base"),
        description="The experiment config each trial starts from.",
    )
    metric: str = Field(..., min_length=1, description="The value to optimise, e.g. val/accuracy.")
    direction: Literal["maximize", "minimize"] = "maximize"
    method: Literal["grid", "random", "tpe", "cmaes"] = "tpe"
    trials: Optional[int] = Field(None, gt=0, le=100_000)
    pruner: PrunerConfig = Field(default_factory=PrunerConfig)
    sampler: dict[str, Any] = Field({}, description="Options of the Optuna sampler.")
    seed: int = Field(0, ge=0, lt=2**32, description="Seed of the sampler.")
    space: dict[str, Dist] = Field(..., min_length=1)
    overrides: list[str] = Field([], description="Overrides every trial gets.")
    storage: Optional[str] = Field(
        None, description=("An Optuna storage URL; default sqlite:///<root>/<name>/study.db")
    )
    keep_last: Optional[int] = Field(1, gt=0, description="checkpoint.keep_last of every trial.")
    workers: int = Field(1, gt=0, le=256)
    heartbeat_s: int = Field(10, gt=0, description="A running trial writes a heartbeat so often.")
    grace_s: int = Field(
        60,
        gt=0,
        description=(
            "A trial without a heartbeat this long (on another host) is taken as killed and retried."
        ),
    )
    max_retries: int = Field(3, ge=0, description="How often one interrupted trial is retried.")

    @field_validator("space", mode="before")
    @classmethod
    def _keys(cls, v: Any) -> Any:
        if isinstance(v, dict):
            for k in v:
                if not isinstance(k, str) or not all(p for p in k.split(".")):
                    raise ValueError(f"{shown(k)} is not a dotted config key")
        return v


def _at_file(exc: ConfigError, path: Path) -> ConfigError:
    return ConfigError(*[f"{path}: {line}" for line in exc.lines])


def load_sweep(path: str | Path, cli: Sequence[str] = ()) -> tuple[SweepConfig, Path, list[str]]:
    """Read and validate a sweep file. ``cli`` overrides whose first key is a sweep field
    (``trials=4``, ``method=random``, ``pruner.type=median``) apply to the sweep; every other one
    goes to each trial's experiment, after the file's own ``overrides``.

    Returns:
        The sweep, the experiment config's path, and the overrides every trial gets.
    """
    from src.core.config import _apply_override, _read_yaml, parse_override

    path = Path(path)
    data = _read_yaml(path)
    data.setdefault("name", path.stem)
    trial_overrides: list[str] = []
    for text in cli:
        keys, value = parse_override(text)
        if keys[0] in SweepConfig.model_fields or keys[0] == "base":
            if keys[0] == "space" and len(keys) > 1:  # space.<dotted key>.<option>
                raise ConfigError(
                    f"override {shown(text, 60)}: the space is edited in the sweep file"
                )
            _apply_override(data, keys, value, text)
        else:
            trial_overrides.append(text)
    if "experiment" in data and "base" in data:
        raise ConfigError(f"{path}: give experiment or base, not both")
    if "space" not in data and "model" in data:
        raise ConfigError(
            f"{path}: is an experiment config, not a sweep file; a sweep file names "
            "it (experiment: ...) with a metric and a space, as "
            "configs/sweep_exp001.yaml does"
        )
    try:
        sweep = SweepConfig.model_validate(data)
    except ValidationError as exc:
        raise _at_file(ConfigError.from_pydantic(exc, model=SweepConfig), path) from None
    try:
        for key, dist in sweep.space.items():
            dist.check(key)
        if sweep.method == "grid":
            size = 1
            for key, dist in sweep.space.items():
                size *= len(dist.grid(key))
                if size > MAX_GRID:
                    raise ConfigError(f"space: the grid has more than {MAX_GRID:,} points")
        elif sweep.trials is None:
            raise ConfigError(
                f"trials: required for method {sweep.method} (a grid defaults "
                "to the product of its axes)"
            )
    except ConfigError as exc:
        raise _at_file(exc, path) from None
    experiment = path.parent / sweep.experiment
    if not experiment.is_file() and Path(sweep.experiment).is_file():
        experiment = Path(sweep.experiment)  # relative to where the command runs
    return sweep, experiment, [*sweep.overrides, *trial_overrides]


def looks_like_sweep(path: str | Path) -> bool:
    """Is this file a sweep (a space and a metric over an experiment), not an experiment?"""
    import yaml

    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except Exception:
        return False
    return (
        isinstance(data, dict)
        and "space" in data
        and "metric" in data
        and ("experiment" in data or "base" in data)
        and "model" not in data
    )


def grid_size(sweep: SweepConfig) -> int:
    return math.prod(len(d.grid(k)) for k, d in sweep.space.items())


def budget(sweep: SweepConfig) -> int:
    """How many trials the sweep runs: ``trials``, and a grid at most its product."""
    if sweep.method == "grid":
        return min(sweep.trials or grid_size(sweep), grid_size(sweep))
    if sweep.trials is None:
        raise ConfigError(f"trials: method {sweep.method} needs a number of trials")
    return sweep.trials


def as_override(key: str, value: Any) -> str:
    """``key=value`` with the value written so the config's YAML reads it back exactly."""
    return f"{key}={json.dumps(value)}"


def check_space(
    sweep: SweepConfig,
    sweep_path: Path,
    experiment: Path,
    overrides: list[str],
    imports: Sequence[str] = (),
) -> None:
    """Validate every bound and choice of the space on the experiment config, exactly as a run
    validates its config; raises one line per problem naming the space entry."""
    from src.core.errors import UserError
    from src.run.experiment import prepare

    prepare(str(experiment), overrides, list(imports))  # the experiment itself first
    problems: list[str] = []
    for key, dist in sweep.space.items():
        for value in dist.bounds():
            try:
                prepare(str(experiment), [*overrides, as_override(key, value)], list(imports))
            except UserError as exc:
                # the experiment alone passed, so the line is about this value
                first = exc.lines[0] if exc.lines else "refused"
                problems.append(
                    f"{sweep_path}: space.{key} = {json.dumps(value)}: {_without_source(first)}"
                )
                break
    if not problems:  # every end of every axis at once (checks across sections)
        for pick in (0, -1):
            values = [as_override(k, d.bounds()[pick]) for k, d in sweep.space.items()]
            try:
                prepare(str(experiment), [*overrides, *values], list(imports))
            except UserError as exc:
                problems.append(
                    f"{sweep_path}: space with every axis at its "
                    f"{'low' if pick == 0 else 'high'} end: "
                    f"{_without_source(exc.lines[0])}"
                )
    if problems:
        raise ConfigError(*problems)


def _without_source(line: str) -> str:
    """``override 'x=1': x: bad`` -> ``x: bad`` (the space entry is named instead)."""
    if line.startswith("override '"):
        end = line.find("': ")
        if end > 0:
            return line[end + 3 :]
    return line
