"""Local folders named in a config: a path, or ``pkg:<package>/<sub/folder>`` inside an installed
Python package (how a pretrained model or tokenizer ships without a download)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from src.core.errors import ConfigError


def resolve_path(path: str, key: str = "model.path") -> Path:
    """A local folder; ``pkg:name/sub`` means the folder ``sub`` inside installed package ``name``."""
    if path.startswith("pkg:"):
        name, _, sub = path[4:].partition("/")
        spec = importlib.util.find_spec(name)
        if spec is None or not spec.submodule_search_locations:
            raise ConfigError(f"{key}: package '{name}' is not installed")
        folder = Path(list(spec.submodule_search_locations)[0]) / sub
    else:
        folder = Path(path).expanduser()
    if not folder.is_dir():
        raise ConfigError(f"{key}: not a local folder: {path}")
    return folder
