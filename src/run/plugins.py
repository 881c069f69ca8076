"""User modules that register components: ``imports:`` in YAML, ``--import`` on the command
line (module names or ``.py`` files) and the ``src.plugins`` entry-point group.

    import_user_modules(["my_pkg.my_module", "plugins/my_model.py"], "--import")
"""

from __future__ import annotations

import hashlib
import importlib
import os
import re
import sys
from pathlib import Path

from src.core.errors import ConfigError, UserError, library_files, library_message, shown

PLUGIN_GROUP = "src.plugins"


_MODULE_NAME = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*")


def import_user_modules(modules: list[str], where: str = "imports") -> None:
    """Import user modules that register components (``imports:`` in YAML, ``--import``).

    Each is a module name (found on ``sys.path``, or else in the current folder) or a ``.py``
    file path. A file is imported under a private module name, so a file called ``json.py`` or
    ``tokenizers.py`` never stands in for the real module. A module that is missing, has a
    syntax error or raises while importing is a one-line :class:`ConfigError` naming the file
    and line at fault.
    """
    cwd = os.getcwd()
    if cwd not in sys.path:  # last: a file in the current folder never shadows an installed one
        sys.path.append(cwd)
    for i, name in enumerate(modules):
        at = f"{where}.{i}" if where == "imports" else where
        try:
            if name.endswith(".py") or "/" in name or os.sep in name:
                _import_file(Path(name), at)
            elif not _MODULE_NAME.fullmatch(name):
                raise ConfigError(
                    f"{at}: {shown(name)} is not a module name (pkg.module) or a .py file"
                )
            else:
                importlib.import_module(name)
        except UserError:
            raise
        except ModuleNotFoundError as exc:
            if exc.name and (name == exc.name or name.startswith(exc.name + ".")):
                raise ConfigError(
                    f"{at}: no module {shown(name)} in the current folder ({cwd}) or on PYTHONPATH"
                ) from None
            raise ConfigError(
                f"{at}: importing {shown(name)} failed: {_where_raised(exc)}{library_message(exc)}"
            ) from exc
        except SyntaxError as exc:
            file = _short_path(exc.filename or name)
            raise ConfigError(
                f"{at}: {file}:{exc.lineno}: SyntaxError: {exc.msg} (importing {shown(name)})"
            ) from None
        except Exception as exc:  # the module raised while importing
            raise ConfigError(
                f"{at}: importing {shown(name)} failed: {_where_raised(exc)}{library_message(exc)}"
            ) from exc


def plugin_module_name(path: Path) -> str:
    """The private name a ``.py`` file given to ``--import`` is imported under: its stem and a
    hash of its full path (``json.py`` -> ``tessera_plugin_json_1f2e3d4c``), never a name
    another module could have."""
    digest = hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:8]
    return f"tessera_plugin_{path.stem}_{digest}"


def _import_file(path: Path, at: str) -> None:
    import importlib.util

    if not path.is_file():
        raise ConfigError(f"{at}: {shown(str(path))}: no such file")
    if not _MODULE_NAME.fullmatch(path.stem):
        raise ConfigError(f"{at}: {shown(path.name)} cannot be a module name")
    name = plugin_module_name(path)
    if name in sys.modules:  # given twice (imports: and --import): it has registered already
        return
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:  # a .py path always has one
        raise ConfigError(f"{at}: {shown(str(path))}: not importable as a Python module")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # pickling and dataclasses look their module up by name
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise


def _short_path(file: str) -> str:
    try:
        rel = os.path.relpath(file)
    except ValueError:
        return file
    return rel if not rel.startswith("..") else file


def _where_raised(exc: BaseException) -> str:
    """``file:line: `` of the innermost frame that raised ``exc``."""
    import traceback

    frames = traceback.extract_tb(exc.__traceback__)
    own = [f for f in frames if not f.filename.startswith(library_files())]
    if not (own or frames):
        return ""
    frame = (own or frames)[-1]
    return f"{_short_path(frame.filename)}:{frame.lineno}: "


def load_plugins() -> None:
    """Import every module advertised in the ``src.plugins`` entry-point group."""
    from importlib.metadata import entry_points

    for ep in entry_points(group=PLUGIN_GROUP):
        try:
            ep.load()
        except ImportError as exc:
            raise ConfigError(f"plugin '{ep.name}' ({ep.value}): cannot import: {exc}") from None
