"""The built-in components: which modules register them, and their names without importing them.

``load_builtins()`` imports every built-in module (so registration never depends on import order).
``builtin_names()`` reads the same modules' source with ``ast`` and finds each
``REGISTRY.register("name")``, so ``--list`` answers without importing torch.
"""
from __future__ import annotations

import ast
import importlib
from pathlib import Path

BUILTIN_MODULES = (
    "src.data.digits",
    "src.data.image_folder",
    "src.data.samplers",
    "src.data.views",
    "src.data.text",
    "src.data.jsonl",
    "src.data.docstrings",
    "src.models.mlp",
    "src.models.cnn",
    "src.models.timm_backbone",
    "src.models.hf",
    "src.algorithms",
    "src.core.optim",
    "src.core.loggers",
    "src.core.callbacks",
    "src.distributed",
)

_ROOT = Path(__file__).resolve().parents[2]


def load_builtins() -> None:
    for name in BUILTIN_MODULES:
        importlib.import_module(name)


def _module_files(name: str) -> list[Path]:
    path = _ROOT.joinpath(*name.split("."))
    if path.is_dir():
        return sorted(path.rglob("*.py"))
    return [path.with_suffix(".py")]


def _tuple_constants(tree: ast.Module) -> dict[str, list[str]]:
    """Module-level ``NAME = ("a", "b", ...)`` assignments of string literals."""
    out = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and isinstance(node.value, (ast.Tuple, ast.List)):
            items = [e.value for e in node.value.elts if isinstance(e, ast.Constant)]
            if items and all(isinstance(i, str) for i in items):
                for target in node.targets:
                    if isinstance(target, ast.Name):
                        out[target.id] = items
    return out


def _registrations(tree: ast.Module) -> list[tuple[str, str, str]]:
    """(REGISTRY variable, name, first docstring line) for each ``X.register(...)`` call."""
    consts = _tuple_constants(tree)
    loops: dict[str, list[str]] = {}  # loop variable -> names it runs over
    for node in ast.walk(tree):
        if isinstance(node, ast.For) and isinstance(node.target, ast.Tuple):
            # `for a, b in f().items(): if a in CONST:` -> CONST's names
            for inner in ast.walk(node):
                if isinstance(inner, ast.Compare) and isinstance(inner.left, ast.Name) and \
                        any(isinstance(c, ast.Name) and c.id in consts for c in inner.comparators):
                    loops[inner.left.id] = consts[inner.comparators[0].id]
        elif isinstance(node, ast.For) and isinstance(node.target, ast.Name) and \
                isinstance(node.iter, ast.Name) and node.iter.id in consts:
            loops[node.target.id] = consts[node.iter.id]
    found = []
    for node in ast.walk(tree):
        targets = []
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            doc = (ast.get_docstring(node) or "").strip().splitlines()
            targets = [(d, doc[0] if doc else "") for d in node.decorator_list]
        elif isinstance(node, ast.Expr) and isinstance(node.value, ast.Call) and \
                isinstance(node.value.func, ast.Call):
            targets = [(node.value.func, "")]
        for call, doc in targets:
            if not (isinstance(call, ast.Call) and isinstance(call.func, ast.Attribute)
                    and call.func.attr == "register" and isinstance(call.func.value, ast.Name)
                    and call.args):
                continue
            arg = call.args[0]
            if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                found.append((call.func.value.id, arg.value, doc))
            elif isinstance(arg, ast.Name) and arg.id in loops:
                found += [(call.func.value.id, n, "torch.optim." + n) for n in loops[arg.id]]
    return found


def builtin_names() -> dict[str, dict[str, str]]:
    """registry name -> {component name: one-line summary}, read from source, no imports."""
    from src.core.registry import ALL

    by_var = {name.upper(): name for name in ALL}
    out: dict[str, dict[str, str]] = {name: {} for name in ALL}
    for module in BUILTIN_MODULES:
        for f in _module_files(module):
            tree = ast.parse(f.read_text(), str(f))
            for var, name, doc in _registrations(tree):
                if var in by_var:
                    out[by_var[var]][name] = doc
    return out
