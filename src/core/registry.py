"""Registries: every buildable component of an experiment is looked up here by name.

A component joins with a decorator, in the project or in the user's own module::

    from src.core.registry import TASKS

    @TASKS.register("my_task")
    class MyTask(Task):
        def __init__(self, model, temperature: float = 0.1): ...

and is then built from its YAML section (``task: {type: my_task, temperature: 0.2}``).
``build`` validates the section against the entry's signature (or its ``params_model``) before
constructing anything, so a wrong key or type fails at load time with its dotted path.
Only registered names can be built: a ``type`` is never an import path.

Built-ins join one way: a built-in X is a file in its package (``src/models/``, ``src/data/``,
``src/algorithms/``, ``src/distributed/``, ``src/core/callbacks/``) that registers itself with the
decorator, plus its name in the package's ``__init__`` (``from src.models import cnn, hf, ...``).
``src.run.catalog`` imports those packages before a run and reads the same files for ``--list``.
User code joins through ``imports:`` in YAML, ``--import`` or the ``src.plugins`` entry points.

This module imports nothing heavy, so ``--help`` and ``--list`` stay fast.
"""

from __future__ import annotations

import contextlib
import difflib
import inspect
from collections.abc import Callable, Iterable
from typing import Any, Literal

from src.core.errors import (
    TRACEBACK_HINT,
    ConfigError,
    UserError,
    is_program_error,
    library_message,
    shown,
)


class Registry:
    """A name -> component table.

    Args:
        name: plural noun used in messages (``"models"``).
        doc: what every entry must do (shown by ``--list``).
        injected: parameter names the platform passes to ``build`` itself (e.g. ``params`` for
            optimizers); a config may not set them.
    """

    def __init__(self, name: str, doc: str, injected: Iterable[str] = (), singular: str = ""):
        self.name = name
        self.singular = singular or name[:-1]
        self.doc = doc
        self.injected = frozenset(injected)
        self._entries: dict[str, Callable[..., Any]] = {}
        self._field_types: dict[str, dict[str, Any]] = {}

    def register(
        self, name: str, field_types: dict[str, Any] | None = None
    ) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        """Decorator that registers a class or factory function under ``name``.

        ``field_types`` narrows the types of some parameters for validation (e.g. a learning
        rate > 0 for a class whose signature says only ``float``), without touching the class.
        """

        def decorator(obj: Callable[..., Any]) -> Callable[..., Any]:
            held = self._entries.get(name)
            if held is not None and held is not obj:
                raise ValueError(
                    f"{self.name} already has '{name}', registered by module {held.__module__}"
                )
            self._entries[name] = obj
            if field_types:
                self._field_types[name] = dict(field_types)
            return obj

        return decorator

    def field_types(self, name: str) -> dict[str, Any]:
        """The narrowed parameter types ``name`` was registered with (see ``register``)."""
        return dict(self._field_types.get(name, {}))

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def get(self, name: str, path: str = "type") -> Callable[..., Any]:
        """The entry registered as ``name``; an unknown name lists the choices and the closest."""
        if not isinstance(name, str) or name not in self._entries:
            close = difflib.get_close_matches(str(name), self.names(), n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise ConfigError(
                f"{path}: unknown {self.singular} {shown(name, 60)}{hint} "
                f"(available: {', '.join(self.names()) or 'none'})"
            )
        return self._entries[name]

    def validate(self, section: dict[str, Any], path: str) -> dict[str, Any]:
        """Check a section (``type`` plus parameters) and return its parameters, coerced.

        Raises:
            ConfigError: one line per problem, each with its dotted path under ``path``.
        """
        if not isinstance(section, dict) or "type" not in section:
            raise ConfigError(f"{path}: expected a mapping with a 'type' key, got {shown(section)}")
        params = {k: v for k, v in section.items() if k != "type"}
        entry = self.get(section["type"], f"{path}.type")
        for key in sorted(self.injected & params.keys()):
            raise ConfigError(f"{path}.{key}: is set by the platform, not by the config")
        model = params_model(entry, self.injected, self._field_types.get(section["type"]))
        from pydantic import ValidationError

        try:
            checked = model.model_validate(params)
        except ValidationError as exc:
            raise ConfigError.from_pydantic(exc, path, model=model) from None
        # Keep only what the user gave (coerced), so entries see their own defaults.
        return {k: getattr(checked, k) for k in params}

    def build(self, section: dict[str, Any], path: str | None = None, **injected: Any) -> Any:
        """Validate ``section`` and construct its entry with the platform's ``injected`` values."""
        path = path or self.name
        params = self.validate(section, path)
        entry = self._entries[section["type"]]
        given = {
            k: v.get() if isinstance(v, Lazy) else v for k, v in _accepted(entry, injected).items()
        }
        with building(path):
            return entry(**params, **given)


class Lazy:
    """An injected value made only when the entry being built takes it: a sampler that never
    looks at labels does not make the platform read every sample for them."""

    def __init__(self, make: Callable[[], Any]):
        self.make = make

    def get(self) -> Any:
        return self.make()


@contextlib.contextmanager
def building(path: str):
    """Turn a value refused while building the component at ``path`` into a config error.

    The schema admits what a type says; a library may still refuse a value (a learning rate it
    finds out of range, a layer width it cannot allocate). That refusal is a config error of the
    section that asked for it: one line with the section's path and the library's message (the
    original exception is its ``__cause__``, printed with ``--traceback``). A program error (a
    NameError in a user's task, a TypeError in a strategy: see
    :func:`~src.core.errors.is_program_error`) is no config error and goes on as it is.
    """
    try:
        yield
    except UserError:
        raise
    except Exception as exc:
        if is_program_error(exc):
            raise
        err = ConfigError(f"{path}: {library_message(exc)}{TRACEBACK_HINT}")
        err.origin = exc  # kept for --traceback (re-raising may drop the cause)
        raise err from exc


def _accepted(entry: Callable[..., Any], offered: dict[str, Any]) -> dict[str, Any]:
    """The injected values an entry takes: those its signature names (all, with ``**kwargs``)."""
    target = entry.__init__ if inspect.isclass(entry) else entry
    try:
        params = inspect.signature(target).parameters
    except (TypeError, ValueError):
        return offered
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return offered
    return {k: v for k, v in offered.items() if k in params}


def params_model(
    entry: Callable[..., Any], skip: Iterable[str] = (), field_types: dict[str, Any] | None = None
):
    """The pydantic model that validates an entry's parameters.

    An entry may declare ``params_model`` (a pydantic model) itself; otherwise one is derived from
    its signature: annotations become field types, defaults stay defaults, and ``**kwargs`` entries
    accept extra keys.
    """
    declared = getattr(entry, "params_model", None)
    if declared is not None:
        return declared
    from pydantic import ConfigDict, create_model

    target = entry.__init__ if inspect.isclass(entry) else entry
    try:
        sig = inspect.signature(target, eval_str=True)
    except (NameError, TypeError, ValueError):
        sig = inspect.signature(target)
    fields: dict[str, Any] = {}
    extra: Literal["forbid", "allow"] = "forbid"
    for i, (pname, p) in enumerate(sig.parameters.items()):
        if inspect.isclass(entry) and i == 0:
            continue  # self
        if p.kind is p.VAR_KEYWORD:
            extra = "allow"
            continue
        if p.kind is p.VAR_POSITIONAL or pname in skip:
            continue
        ann = Any if p.annotation is p.empty or isinstance(p.annotation, str) else p.annotation
        ann = (field_types or {}).get(pname, _config_type(ann))
        fields[pname] = (ann, ... if p.default is p.empty else p.default)
    config = ConfigDict(
        extra=extra, arbitrary_types_allowed=True, protected_namespaces=(), allow_inf_nan=False
    )
    return create_model(f"{getattr(entry, '__name__', 'Entry')}Params", __config__=config, **fields)


def _config_type(ann: Any) -> Any:
    """Drop torch types from a Union (``float | Tensor`` -> ``float``): YAML can't hold tensors."""
    import types
    import typing

    if typing.get_origin(ann) in (typing.Union, types.UnionType):
        kept = [
            a
            for a in typing.get_args(ann)
            if not (inspect.isclass(a) and a.__module__.split(".")[0] == "torch")
        ]
        if kept and len(kept) < len(typing.get_args(ann)):
            return typing.Union[tuple(kept)] if len(kept) > 1 else kept[0]
    return ann


DATASETS = Registry(
    "datasets",
    "Build the train/val datasets. Return a DataModule with `train`, `val` and `info` (DatasetInfo).",
    injected=("seed", "run_dir"),
)
MODELS = Registry(
    "models",
    "Build an nn.Module from the data's DatasetInfo (`info`): classes and input shape flow from data.",
    injected=("info",),
)
TASKS = Registry(
    "tasks",
    "A training algorithm (Task): owns model, loss and evaluation; returns {'loss': ...} per step.",
    injected=("model",),
)
OPTIMIZERS = Registry(
    "optimizers",
    "A torch.optim.Optimizer built over the task's parameter groups (`params`).",
    injected=("params",),
)
SCHEDULERS = Registry(
    "schedulers",
    "A per-step LR schedule: a torch LRScheduler built from `optimizer` and `total_steps`.",
    injected=("optimizer", "total_steps"),
)
STRATEGIES = Registry(
    "strategies",
    "How the model is spread over processes and devices (single, ddp, fsdp, deepspeed).",
    singular="strategy",
)
CALLBACKS = Registry(
    "callbacks",
    "A Callback: hooks into the training loop; its state_dict() is checkpointed.",
)
LOGGERS = Registry(
    "loggers",
    "A Logger: receives metrics dicts and hyper-parameters; only the main process logs.",
    injected=("run_dir",),
)
SAMPLERS = Registry(
    "samplers",
    "A training batch sampler (pk, class_balanced): resumable per (seed, epoch), sharded by rank.",
    injected=("labels", "lengths", "batch_size", "seed", "rank", "world_size"),
)
LOSSES = Registry("losses", "A loss module: (outputs, targets) -> scalar tensor.", singular="loss")
TRANSFORMS = Registry("transforms", "A tensor -> tensor transform (augmentations, views).")
REWARDS = Registry("rewards", "A reward function for alignment: (prompts, completions) -> tensor.")

ALL: dict[str, Registry] = {
    r.name: r
    for r in (
        DATASETS,
        MODELS,
        TASKS,
        OPTIMIZERS,
        SCHEDULERS,
        STRATEGIES,
        CALLBACKS,
        LOGGERS,
        SAMPLERS,
        LOSSES,
        TRANSFORMS,
        REWARDS,
    )
}
