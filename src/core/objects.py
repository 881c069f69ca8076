"""Python objects handed to the Python API (a model, a loss function, datasets), by reference.

A config names them as strings (``model: {type: module, ref: "__main__.Net"}``): the reference is
the object's qualified class (or function) name, so the run's ``config.yaml`` says what was
trained and a rerun of the same script resumes the same run folder. The objects themselves live
in this process only.
"""

from __future__ import annotations

from typing import Any

from src.core.errors import ConfigError, shown

_OBJECTS: dict[str, Any] = {}


def qualified_name(obj: Any) -> str:
    kind = (
        obj
        if isinstance(obj, type) or callable(obj) and hasattr(obj, "__qualname__")
        else type(obj)
    )
    return f"{getattr(kind, '__module__', '?')}.{getattr(kind, '__qualname__', kind.__name__)}"


def put(obj: Any, suffix: str = "") -> str:
    """Keep ``obj`` for this process; returns its reference (its qualified name + ``suffix``)."""
    ref = qualified_name(obj) + suffix
    _OBJECTS[ref] = obj
    return ref


def get(ref: str, path: str) -> Any:
    """The object behind ``ref``; a ConfigError naming ``path`` when this process has none."""
    if ref not in _OBJECTS:
        raise ConfigError(
            f"{path}: {shown(ref)} is a Python object given to the Python API "
            "(Experiment.from_modules) in another process; run that script again"
        )
    return _OBJECTS[ref]
