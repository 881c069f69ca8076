"""The experiment config: one YAML file, validated by pydantic before anything heavy starts.

Precedence: CLI override > YAML (a file's own keys > its ``base:``) > default. Every section is a
pydantic model with ``extra="forbid"``; component sections (``type: name`` plus parameters) are
checked against their registry entry's signature by :func:`validate_components`.

    cfg, origins = load_config("configs/exp001.yaml", ["trainer.max_steps=50"])
"""

from __future__ import annotations

import copy
import functools
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from src.core.errors import ConfigError, library_message, shown
from src.core.optimizer_config import (
    optimizer_sections,
    optimizer_structure_errors,
    optimizers_errors,
    regex_error,
    registry_section,
)

Section = dict[str, Any]  # a component: {"type": name, **params}, checked by its registry


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class DataConfig(BaseModel):
    """Data: loader options here; every other key goes to the DATASETS entry named by ``type``."""

    model_config = ConfigDict(extra="allow", allow_inf_nan=False)
    type: str = Field("digits", description="DATASETS entry that builds train and val sets.")
    batch_size: int = Field(64, gt=0, description="Global batch size of one micro-step.")
    eval_batch_size: Optional[int] = Field(None, gt=0, description="Batch size for evaluation.")
    num_workers: int = Field(0, ge=0, description="DataLoader worker processes.")
    pin_memory: bool = Field(False, description="Pin host memory (faster copies to a GPU).")
    drop_last: bool = Field(True, description="Drop the last incomplete training batch.")
    shuffle: bool = Field(True, description="Shuffle training samples each epoch.")
    sampler: Optional[Section] = Field(None, description="SAMPLERS entry (pk, class_balanced).")
    audit: bool = Field(
        False,
        description=(
            "Each rank appends the training-sample ids of every step to "
            "experiments/<name>/audit/rank<r>.jsonl (proof that a resumed run skips and "
            "repeats nothing)."
        ),
    )


class TrainerConfig(_Strict):
    """The loop. Training stops at ``max_steps`` or ``max_epochs``, whichever comes first."""

    max_epochs: Optional[int] = Field(None, gt=0, description="Epochs to train.")
    max_steps: Optional[int] = Field(None, gt=0, description="Optimizer steps to train.")
    precision: Literal["fp32", "bf16", "fp16"] = Field("fp32", description="Autocast dtype.")
    grad_accum_steps: int = Field(1, gt=0, description="Micro-batches per optimizer step.")
    grad_clip: Optional[float] = Field(None, gt=0, description="Max gradient norm (None: off).")
    log_every: int = Field(10, gt=0, description="Log averaged metrics every N steps.")
    eval_every_n_steps: Optional[int] = Field(None, gt=0, description="Evaluate every N steps.")
    eval_every_n_epochs: Optional[int] = Field(1, gt=0, description="Evaluate every N epochs.")
    max_bad_steps: int = Field(5, gt=0, description="Stop after N consecutive non-finite steps.")
    loss_spike_sigmas: Optional[float] = Field(
        None,
        gt=0,
        description=(
            "Skip an update whose loss (mean over ranks) exceeds the mean of the last "
            "loss_spike_window steps by this many standard deviations (None: off)."
        ),
    )
    loss_spike_window: int = Field(
        50,
        ge=2,
        description=(
            "Applied steps the loss-spike statistics cover; steps are judged once it is full."
        ),
    )
    compile: bool = Field(False, description="torch.compile the model.")
    gradient_checkpointing: bool = Field(False, description="Recompute activations (HF/timm).")
    deterministic: bool = Field(False, description="Deterministic algorithms only.")
    peak_tflops: Optional[float] = Field(
        None,
        gt=0,
        description=(
            "Device peak TFLOP/s for model FLOPs utilisation (train/mfu); known GPUs are detected."
        ),
    )


class CheckpointConfig(_Strict):
    """Checkpoints under ``experiments/<name>/checkpoints/step_<N>/``."""

    every_n_steps: Optional[int] = Field(None, gt=0, description="Save every N steps.")
    every_n_epochs: Optional[int] = Field(None, gt=0, description="Save every N epochs.")
    save_last: bool = Field(True, description="Save when training ends.")
    save_on_eval: bool = Field(False, description="Save after every evaluation (for top_k).")
    keep_last: Optional[int] = Field(3, gt=0, description="Keep the newest N (None: all).")
    keep_every: Optional[int] = Field(None, gt=0, description="Also keep steps divisible by N.")
    top_k: int = Field(0, ge=0, description="Also keep the best K by `monitor`.")
    monitor: Optional[str] = Field(None, description="Metric for top_k, e.g. val/accuracy.")
    mode: Literal["min", "max"] = Field("max", description="Whether the monitor improves up/down.")
    resume: str = Field("auto", description="auto | never | path to a checkpoint directory.")
    async_save: bool = Field(
        False,
        description=(
            "Copy and write model and optimizer in a background thread (DCP) while the next step's "
            "forward and backward run; the update waits for the copy. COMMIT follows the write."
        ),
    )
    trust_pickles: bool = Field(
        False,
        description=(
            "Skip the check that refuses a checkpoint whose pickles name anything but tensors and "
            "the records of our formats (DeepSpeed and DCP unpickle without restriction). Only for "
            "checkpoints whose origin you trust."
        ),
    )


class LoggingConfig(_Strict):
    """Where metrics go; every logger writes under ``experiments/<name>/``."""

    loggers: list[Union[str, Section]] = Field(["console", "jsonl"], description="LOGGERS.")
    root: str = Field("experiments", description="Folder that holds one folder per run.")


def slurm_seconds(text: str) -> int:
    """A SLURM time limit in seconds: minutes, MM:SS, HH:MM:SS, D-HH, D-HH:MM or D-HH:MM:SS."""
    m = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", str(text).strip())
    if m is None:
        raise ValueError(f"{text!r} is not a SLURM time (minutes, MM:SS, HH:MM:SS or D-HH:MM:SS)")
    days, a, b, c = m.groups()
    if days is not None:  # D-HH[:MM[:SS]]
        return int(days) * 86400 + int(a) * 3600 + int(b or 0) * 60 + int(c or 0)
    if c is not None:  # HH:MM:SS
        return int(a) * 3600 + int(b) * 60 + int(c)
    if b is not None:  # MM:SS
        return int(a) * 60 + int(b)
    return int(a) * 60  # minutes


class SlurmConfig(_Strict):
    """How ``python -m src.main submit`` asks SLURM for the run; changes nothing elsewhere."""

    nodes: int = Field(1, gt=0, description="Nodes of the allocation (one torchrun each).")
    gpus_per_node: int = Field(0, ge=0, description="GPUs per node (0 on CPU clusters).")
    tasks_per_node: Optional[int] = Field(
        None, gt=0, description="Processes per node (default: gpus_per_node, or 1)."
    )
    cpus_per_task: Optional[int] = Field(None, gt=0, description="CPUs of each node's task.")
    mem: Optional[str] = Field(None, description="Memory per node (SLURM's --mem: 64G).")
    time: Optional[str] = Field(None, description="Time limit (HH:MM:SS, D-HH:MM:SS, minutes).")
    partition: Optional[str] = Field(None, description="SLURM partition.")
    account: Optional[str] = Field(None, description="SLURM account.")
    qos: Optional[str] = Field(None, description="SLURM quality of service.")
    signal_grace_s: int = Field(
        120,
        gt=0,
        description="Seconds before the time limit the job is told to checkpoint and requeue.",
    )
    max_requeues: int = Field(
        3, ge=0, description="Times the job requeues itself after a time limit or a preemption."
    )
    launcher: Literal["torchrun", "srun"] = Field(
        "torchrun",
        description="torchrun per node (c10d rendezvous), or one srun task per process.",
    )
    setup: list[str] = Field(
        [], description="Shell lines run before the launch (module load, venv activation)."
    )
    sbatch: list[str] = Field([], description="Extra #SBATCH options, passed through.")

    @property
    def processes_per_node(self) -> int:
        return self.tasks_per_node or self.gpus_per_node or 1

    @field_validator("time")
    @classmethod
    def _time(cls, v: Optional[str]) -> Optional[str]:
        if v is not None:
            slurm_seconds(v)
        return v

    @field_validator("setup", "sbatch", mode="before")
    @classmethod
    def _lines(cls, v: Any) -> Any:
        return [v] if isinstance(v, str) else v

    @model_validator(mode="after")
    def _grace_fits(self) -> SlurmConfig:
        if self.time is not None and slurm_seconds(self.time) <= self.signal_grace_s:
            raise ValueError(
                f"time {self.time} is not longer than signal_grace_s ({self.signal_grace_s} s): "
                "the job would be told to stop before it starts"
            )
        return self


class ExperimentConfig(_Strict):
    """One experiment. Sections map to registries; see configs/exp001.yaml."""

    name: str = Field(..., max_length=128, description="Run name: the folder experiments/<name>/.")
    seed: int = Field(
        0,
        ge=0,
        lt=2**32,
        description=("Seed for python, numpy and torch (offset per rank), 0 <= seed < 2**32."),
    )
    imports: list[str] = Field([], description="User modules imported to register components.")
    needs: dict[str, str] = Field(
        {},
        description=(
            "Files or folders this config reads that another command makes: path -> that command. "
            "A missing one stops the run before anything is built, naming its command."
        ),
    )
    data: DataConfig = Field(default_factory=DataConfig)
    model: Section = Field(..., description="MODELS entry.")
    task: Section = Field(..., description="TASKS entry.")
    optimizer: Section = Field(
        {"type": "adamw"},
        description=(
            "OPTIMIZERS entry; `groups` (per-pattern lr_mult, lr, weight_decay, ...) and "
            "`layer_decay` shape its parameter groups."
        ),
    )
    optimizers: list[Section] = Field(
        [],
        description=(
            "Several optimizers by pattern: OPTIMIZERS entries with `match` (a regex on parameter "
            "names; the last may omit it and takes the rest) and their own `scheduler`. Replaces "
            "`optimizer`."
        ),
    )
    freeze: list[str] = Field(
        [],
        description=(
            "Regexes on parameter names (model.blocks.0.attn.qkv.weight): matching parameters are "
            "frozen."
        ),
    )
    scheduler: Section = Field({"type": "constant"}, description="SCHEDULERS entry.")
    trainer: TrainerConfig = Field(default_factory=TrainerConfig)
    strategy: Section = Field({"type": "single"}, description="STRATEGIES entry.")
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)
    callbacks: list[Section] = Field(
        [], description=("CALLBACKS entries (a bare name is {type: name}).")
    )
    slurm: Optional[SlurmConfig] = Field(
        None, description="How `python -m src.main submit` runs it on a SLURM cluster."
    )

    @field_validator("callbacks", mode="before")
    @classmethod
    def _bare_names(cls, v: Any) -> Any:
        return [{"type": c} if isinstance(c, str) else c for c in v] if isinstance(v, list) else v

    @field_validator("name")
    @classmethod
    def _safe_name(cls, v: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", v):
            raise ValueError("must be letters, digits, '.', '_' or '-' (it names a folder)")
        return v

    @field_validator("model", "task", "optimizer", "scheduler", "strategy")
    @classmethod
    def _has_type(cls, v: Section) -> Section:
        if "type" not in v:
            raise ValueError("needs a 'type' key naming a registered component")
        return v

    @field_validator("optimizers")
    @classmethod
    def _each_has_type(cls, v: list[Section]) -> list[Section]:
        for i, s in enumerate(v):
            if "type" not in s:
                raise ValueError(f"entry {i} needs a 'type' key naming a registered optimizer")
        return v

    @field_validator("freeze")
    @classmethod
    def _regexes(cls, v: list[str]) -> list[str]:
        for i, pattern in enumerate(v):
            regex_error(pattern, f"entry {i}")
        return v


# ---------------------------------------------------------------- loading


MAX_DEPTH = 32  # levels of nesting in a config document or override
MAX_VALUES = 100_000  # values in a document, aliases expanded
MAX_FILE_BYTES = 10_000_000
_JSON_TYPES = (str, int, float, bool, type(None))


@functools.lru_cache(maxsize=1)
def _yaml_loader():
    """A SafeLoader with YAML 1.2's plain scalars, strict about duplicate keys.

    ``3e-4`` reads as a float (YAML 1.1 wants ``3.0e-4``); only ``true``/``false`` are booleans
    (``off``, ``no``, ``yes`` stay strings) and dates stay strings; a key given twice in one
    mapping is an error instead of the last one silently winning.
    """
    import yaml

    class Loader(yaml.SafeLoader):
        def construct_mapping(self, node, deep=False):
            if isinstance(node, yaml.MappingNode):
                seen: dict[str, int] = {}
                for key_node, _ in node.value:
                    if (
                        isinstance(key_node, yaml.ScalarNode)
                        and key_node.tag != "tag:yaml.org,2002:merge"
                    ):
                        if key_node.value in seen:
                            raise yaml.constructor.ConstructorError(
                                None,
                                None,
                                f"duplicate key '{key_node.value}' (first given on "
                                f"line {seen[key_node.value] + 1})",
                                key_node.start_mark,
                            )
                        seen[key_node.value] = key_node.start_mark.line
            return super().construct_mapping(node, deep)

    dropped = ("tag:yaml.org,2002:bool", "tag:yaml.org,2002:timestamp")
    Loader.yaml_implicit_resolvers = {
        first: [(tag, rx) for tag, rx in resolvers if tag not in dropped]
        for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
    }
    Loader.add_implicit_resolver(
        "tag:yaml.org,2002:bool",
        re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
        list("tTfF"),
    )
    Loader.add_implicit_resolver(
        "tag:yaml.org,2002:float",
        re.compile(
            r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                    |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
                    |\.[0-9_]+(?:[eE][-+][0-9]+)?
                    |[-+]?\.(?:inf|Inf|INF)
                    |\.(?:nan|NaN|NAN))$""",
            re.X,
        ),
        list("-+0123456789."),
    )
    return Loader


def yaml_load(text: str, where: str = "<yaml>") -> Any:
    """Parse YAML with the safe loader above: no tag can construct a Python object.

    Raises:
        ConfigError: one line naming ``where`` (and line:column when known) for invalid YAML,
            a value of a tag that cannot be built, nesting deeper than :data:`MAX_DEPTH`, a
            recursive alias, or aliases that expand to more than :data:`MAX_VALUES` values.
    """
    import yaml

    loader = None
    try:
        loader = _yaml_loader()(text)  # the reader checks the characters here
        data = loader.get_single_data()
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        at = f":{mark.line + 1}:{mark.column + 1}" if mark else ""
        problem = " ".join(str(exc.problem or exc.context or "").split())
        raise ConfigError(f"{where}{at}: invalid YAML: {problem}") from None
    except yaml.YAMLError as exc:  # e.g. a NUL byte: the reader's message, first line only
        raise ConfigError(f"{where}: invalid YAML: {str(exc).splitlines()[0]}") from None
    except RecursionError:
        raise ConfigError(f"{where}: invalid YAML: nested deeper than {MAX_DEPTH} levels") from None
    except (ValueError, TypeError, KeyError, AttributeError, OverflowError) as exc:
        # a tag's value that cannot be built: !!int x, !!bool maybe, a 5000-digit integer
        raise ConfigError(f"{where}: invalid YAML value: {library_message(exc, 120)}") from None
    finally:
        if loader is not None:
            loader.dispose()
    _check_tree(data, where)
    return data


def _check_tree(data: Any, where: str) -> None:
    """Plain data only (mappings with string keys, lists, scalars), bounded in depth and size."""
    count = 0
    open_ids: set[int] = set()

    def walk(node: Any, path: str, depth: int) -> None:
        nonlocal count
        count += 1
        at = f"{where}: {path}" if path else where
        if count > MAX_VALUES:
            raise ConfigError(
                f"{where}: more than {MAX_VALUES:,} values once aliases are "
                "expanded; a config needs far fewer"
            )
        if depth > MAX_DEPTH:
            raise ConfigError(f"{at}: nested deeper than {MAX_DEPTH} levels")
        if isinstance(node, (dict, list)):
            if id(node) in open_ids:
                raise ConfigError(f"{at}: refers to itself (a recursive alias)")
            open_ids.add(id(node))
            for k, v in node.items() if isinstance(node, dict) else enumerate(node):
                if isinstance(node, dict) and not isinstance(k, str):
                    raise ConfigError(f"{at}: key {shown(k)} is not a string")
                walk(v, f"{path}.{k}" if path else str(k), depth + 1)
            open_ids.discard(id(node))
        elif not isinstance(node, _JSON_TYPES):
            raise ConfigError(
                f"{at}: a YAML {type(node).__name__} is not a config value (use a "
                "string, number, boolean, list or mapping)"
            )

    walk(data, "", 0)


def _read_yaml(path: Path) -> dict[str, Any]:
    name = shown(str(path), 120)[1:-1]
    try:
        if path.is_dir():
            raise ConfigError(f"{name}: is a folder, not a config file")
        if not path.is_file():
            import difflib

            near = [p.name for p in path.parent.glob("*.y*ml")] if path.parent.is_dir() else []
            close = difflib.get_close_matches(path.name, near, n=1)
            hint = f"; did you mean {path.parent / close[0]}?" if close else ""
            raise ConfigError(f"{name}: config file not found{hint}")
        if path.stat().st_size > MAX_FILE_BYTES:
            raise ConfigError(
                f"{name}: {path.stat().st_size:,} bytes is too large for a config "
                f"file (limit {MAX_FILE_BYTES:,})"
            )
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{name}: not UTF-8 text (byte {exc.start})") from None
    except (OSError, ValueError) as exc:  # a name too long, a NUL byte, no permission
        reason = getattr(exc, "strerror", None) or library_message(exc, 80)
        raise ConfigError(f"{name}: cannot read the config file: {reason}") from None
    data = yaml_load(text, name)
    if data is None:
        raise ConfigError(f"{name}: config file is empty")
    if not isinstance(data, dict):
        raise ConfigError(f"{name}: expected a mapping at the top, got {type(data).__name__}")
    return data


def _merge(base: dict, top: dict) -> dict:
    """Deep-merge ``top`` into a copy of ``base``: mappings merge, everything else replaces.

    A component section whose ``type`` changes replaces the inherited one whole: the old
    component's parameters mean nothing to the new one.
    """
    out = copy.deepcopy(base)
    for key, value in top.items():
        old = out.get(key)
        if (
            isinstance(value, dict)
            and isinstance(old, dict)
            and value.get("type", old.get("type")) == old.get("type")
        ):
            out[key] = _merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    """Dotted leaf path -> value (lists are leaves; an empty mapping is a leaf)."""
    if not isinstance(d, dict) or not d:
        return {prefix[:-1]: d} if prefix else {}
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(flatten(v, f"{prefix}{k}."))
    return out


def _leaf_sources(data: Any, source: str, prefix: str = "") -> dict[str, str]:
    """dotted leaf path -> source, for every leaf of ``data``."""
    return dict.fromkeys(flatten(data, prefix), source)


def _set_sources(origins: dict[str, str], new: dict[str, str]) -> None:
    for path in new:
        for old in [p for p in origins if p.startswith(path + ".")]:
            del origins[old]
    origins.update(new)


DICT_SOURCE = "<dict>"  # where the values of a config given as a Python dict come from


def _load_with_bases(
    path: Path, seen: tuple[Path, ...] = (), given: Optional[dict] = None
) -> tuple[dict, dict[str, str]]:
    """A file (or the ``given`` dict, whose ``base:`` is relative to the current folder) merged
    over its ``base:`` files, and the file each leaf came from."""
    if given is None and _resolved(path) in seen:
        raise ConfigError(f"{path}: 'base' inheritance forms a cycle")
    if len(seen) > 16:
        raise ConfigError(f"{path}: 'base' files nest more than 16 deep")
    if given is not None:
        if not isinstance(given, dict):
            raise ConfigError(f"config: a mapping of sections (got {type(given).__name__})")
        data = copy.deepcopy(given)
    else:
        data = _read_yaml(path)
    bases = data.pop("base", None)
    merged: dict[str, Any] = {}
    origins: dict[str, str] = {}
    for b in [bases] if isinstance(bases, str) else bases if isinstance(bases, list) else [bases]:
        if bases is None:
            break
        if not isinstance(b, str) or not b.strip() or "\x00" in b or len(b) > 1024:
            raise ConfigError(
                f"{path}: base: expected a config file name (or a list of them), got {shown(b)}"
            )
        bdata, borigins = _load_with_bases(path.parent / b, seen + (_resolved(path),))
        merged = _merge(merged, bdata)
        _set_sources(origins, borigins)
    _set_sources(origins, _leaf_sources(data, str(path)))
    return _merge(merged, data), origins


def _resolved(path: Path) -> Path:
    try:
        return path.resolve()
    except (OSError, RuntimeError, ValueError):  # a loop or a NUL byte: read_yaml reports it
        return path.absolute()


_KEY_PART = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_\-]*")


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"optimizer.lr=3e-4"`` -> (["optimizer", "lr"], 0.0003); values: YAML scalars or lists."""
    key, sep, raw = text.partition("=")
    where = f"override {shown(text, 60)}"
    if not sep or not key:
        raise ConfigError(f"{where}: expected key.path=value")
    parts = key.split(".")
    if len(parts) > MAX_DEPTH:
        raise ConfigError(f"{where}: key path is deeper than {MAX_DEPTH} levels")
    bad = next((p for p in parts if not _KEY_PART.fullmatch(p)), None)
    if bad is not None:
        raise ConfigError(
            f"{where}: {shown(bad, 40) if bad else 'an empty part'} is not a key "
            "(expected key.path=value, keys of letters, digits, '_' and '-')"
        )
    value = yaml_load(raw, where) if raw.strip() else None
    return parts, value


def _apply_override(data: dict, keys: list[str], value: Any, text: str) -> None:
    node: Any = data
    for i, k in enumerate(keys[:-1]):
        if isinstance(node, list) and k.isdigit() and int(k) < len(node):
            node = node[int(k)]
            continue
        if not isinstance(node, dict):
            raise ConfigError(f"override {shown(text, 60)}: {'.'.join(keys[:i])} is not a mapping")
        node = node.setdefault(k, {})
    last = keys[-1]
    if isinstance(node, list) and last.isdigit() and int(last) < len(node):
        node[int(last)] = value
    elif isinstance(node, dict):
        node[last] = value
    else:
        raise ConfigError(f"override {shown(text, 60)}: {'.'.join(keys[:-1])} is not a mapping")


def _replaces_component(data: dict, keys: list[str], new_type: Any) -> bool:
    """Replace the component section at ``keys`` by ``{type: new_type}`` if its type changes."""
    node: Any = data
    for k in keys[:-1]:
        node = node.get(k) if isinstance(node, dict) else None
    section = node.get(keys[-1]) if isinstance(node, dict) and keys else None
    if isinstance(section, dict) and "type" in section and section["type"] != new_type:
        node[keys[-1]] = {"type": new_type}
        return True
    return False


def raw_component_errors(data: dict, origins: dict[str, str], source: str) -> list[str]:
    """Component-parameter problems of a config that failed validation elsewhere, so that one
    run reports every problem: each well-formed section is checked against its registry."""
    lines = _component_errors(data)
    return _located(ConfigError(*lines), origins, source).lines if lines else []


def _component_errors(data: dict) -> list[str]:
    """Every component section of a config's mapping (raw, or a validated config's dump) that
    names a registered type, checked against its registry entry; one line per problem."""
    from src.core.registry import ALL

    lines: list[str] = []
    checks = component_sections(data)
    for path, section in optimizer_sections(data):
        if isinstance(section, dict):
            more, extra = optimizer_structure_errors(path, section)
            lines += more
            checks += extra
    for reg, path, section in checks:
        if reg in ALL and isinstance(section, dict) and isinstance(section.get("type"), str):
            try:
                ALL[reg].validate(section, path)
            except ConfigError as exc:
                lines += exc.lines
    return lines


def load_config(
    path: str | Path | dict, overrides: Sequence[str] = ()
) -> tuple[ExperimentConfig, dict[str, str]]:
    """Read, inherit, override and validate a config (a file, or a dict of its sections).

    Returns:
        The validated config and ``origins``: dotted path -> the file or ``override`` it came from.
    Raises:
        ConfigError: every problem, one line each, naming its source and dotted path.
    """
    if isinstance(path, dict):
        data, origins = _load_with_bases(Path(DICT_SOURCE), given=path)
        path = DICT_SOURCE
    else:
        data, origins = _load_with_bases(Path(path))
    origins[""] = str(path)  # the main file (run_info tells its values from a base file's)
    for key in ("optimizer", "scheduler", "strategy"):  # an override edits the default section
        if key not in data:
            data[key] = copy.deepcopy(ExperimentConfig.model_fields[key].default)
    parsed = [(text, *parse_override(text)) for text in overrides]
    # `model.type=x` first: a new type replaces the section (the old component's keys go), and
    # the other overrides of this command line then apply to the new component
    parsed.sort(key=lambda t: 0 if t[1][-1:] == ["type"] else 1)
    for text, keys, value in parsed:
        if keys[-1:] == ["type"] and _replaces_component(data, keys[:-1], value):
            section = ".".join(keys[:-1])
            for p in [p for p in origins if p.startswith(section + ".")]:
                del origins[p]
        source = f"override {shown(text, 60)}"
        _apply_override(data, keys, value, text)
        _set_sources(
            origins,
            _leaf_sources({".".join(keys): value}, source)
            if not isinstance(value, dict)
            else _leaf_sources(value, source, ".".join(keys) + "."),
        )
    try:
        cfg = ExperimentConfig.model_validate(data)
    except ValidationError as exc:
        err = _located(
            ConfigError.from_pydantic(exc, model=ExperimentConfig), origins, str(Path(path))
        )
        err.data, err.origins = data, origins  # for the component checks (all problems at once)
        raise err from None
    return cfg, origins


def _located(err: ConfigError, origins: dict[str, str], default: str) -> ConfigError:
    """Prefix each line with the file or override that set the offending path."""
    lines = []
    for line in err.lines:
        loc = line.split(":", 1)[0]
        parts = loc.split(".")
        prefixes = [".".join(parts[:n]) for n in range(len(parts), 0, -1)]
        below = [src for p, src in origins.items() if p.startswith(loc + ".")]
        source = next(
            (origins[p] for p in prefixes if p in origins), below[0] if below else default
        )
        lines.append(f"{source}: {line}")
    return ConfigError(*lines)


def component_sections(data: dict) -> list[tuple[str, str, Any]]:
    """(registry name, dotted path, section) for every component a config names, read from its
    mapping (raw, or a validated config's ``model_dump()``); a section that is not a mapping
    is given as it is. The one table of sections and their registries."""

    def get(node: Any, key: str) -> Any:
        return node.get(key) if isinstance(node, dict) else None

    out: list[tuple[str, str, Any]] = []
    d = data.get("data")
    if isinstance(d, dict):  # its loader options are the platform's, the rest the dataset's
        own = {k: v for k, v in d.items() if k == "type" or k not in DataConfig.model_fields}
        out.append(("datasets", "data", {"type": DataConfig.model_fields["type"].default, **own}))
        if d.get("sampler") is not None:
            out.append(("samplers", "data.sampler", d["sampler"]))
    for reg, key in (
        ("models", "model"),
        ("tasks", "task"),
        ("schedulers", "scheduler"),
        ("strategies", "strategy"),
    ):
        out.append((reg, key, data.get(key)))
    out += [
        ("optimizers", path, registry_section(s) if isinstance(s, dict) else s)
        for path, s in optimizer_sections(data)
    ]
    for reg, path, entries in (
        ("callbacks", "callbacks", data.get("callbacks")),
        ("loggers", "logging.loggers", get(data.get("logging"), "loggers")),
    ):
        if isinstance(entries, list):  # a bare name is {type: name}
            out += [
                (reg, f"{path}.{i}", {"type": s} if isinstance(s, str) else s)
                for i, s in enumerate(entries)
            ]
    return out


def missing_needs(cfg: ExperimentConfig) -> list[str]:
    """One line for each path of ``needs:`` that the config still reads (an override may point
    elsewhere) and that does not exist yet, with the command that makes it."""
    used: set[str] = set()

    def strings(v: Any) -> None:
        if isinstance(v, str):
            used.add(v)
        elif isinstance(v, dict):
            for x in v.values():
                strings(x)
        elif isinstance(v, list):
            for x in v:
                strings(x)

    strings(cfg.model_dump(mode="json", exclude={"needs"}))
    return [
        f"needs: {path} does not exist yet; make it with: {command}"
        for path, command in cfg.needs.items()
        if path in used and not Path(path).exists()
    ]


def validate_components(cfg: ExperimentConfig, origins: dict[str, str], source: str) -> None:
    """Check every component section against its registry entry, and what the strategy cannot
    run (:meth:`Strategy.config_errors`); all problems in one error."""
    from src.core.loop_settings import LoopSettings
    from src.core.registry import STRATEGIES

    lines = _component_errors(cfg.model_dump())
    lines += optimizers_errors(cfg, ExperimentConfig.model_fields["optimizer"].default)
    strategy = STRATEGIES.get(cfg.strategy["type"], "strategy.type")
    check = getattr(strategy, "config_errors", None)
    if check is not None:
        lines += check(cfg.strategy, LoopSettings.of(cfg))
    if lines:
        raise _located(ConfigError(*lines), origins, source)


def dump_config(cfg: ExperimentConfig) -> str:
    """The resolved config as YAML (defaults filled in), as written to the run folder."""
    import yaml

    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
