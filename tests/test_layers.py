"""Imports point down only, and no two modules import each other (docs/extending.md, "Architecture").

    main                 the command line
    run                  the composition root: builds an experiment from a config, exports, lists
    algorithms           tasks: use models, data, distributed and core
    data | models | distributed    each uses core only, never a sibling
    core                 registry, config, trainer, checkpoint, callbacks, loggers, small helpers

Every ``import`` under ``src/`` is read, the ones inside functions too: a function-level import
is still a dependency, it only hides it.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"

LAYERS = {"core": 0, "data": 1, "models": 1, "distributed": 1, "algorithms": 2, "run": 3, "main": 4}


def modules(root: Path) -> dict[str, Path]:
    """Dotted module name -> file, for every module under ``root`` (a ``src`` folder)."""
    out = {}
    for f in sorted(root.rglob("*.py")):
        parts = f.relative_to(root.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = f
    return out


def imports(file: Path, known: dict[str, Path]) -> list[tuple[int, str]]:
    """(line, module) of every ``src.*`` module the file imports, at any depth of the code."""
    found = []
    for node in ast.walk(ast.parse(file.read_text(), str(file))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.startswith("src.")]
        elif (
            isinstance(node, ast.ImportFrom)
            and node.level == 0
            and node.module
            and node.module.split(".")[0] == "src"
        ):
            for a in node.names:  # `from src.run import export` imports the module src.run.export
                sub = f"{node.module}.{a.name}"
                found.append((node.lineno, sub if sub in known else node.module))
    return sorted(set(found))


def package(module: str) -> str:
    """The layer package a module belongs to: ``src.core.callbacks.ema`` -> ``core``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "main"


def violations(root: Path) -> list[str]:
    known = modules(root)
    graph: dict[str, set[str]] = {m: set() for m in known}
    problems = []
    for mod, file in known.items():
        for line, target in imports(file, known):
            graph[mod].add(target)
            src_pkg, dst_pkg = package(mod), package(target)
            if src_pkg == dst_pkg or dst_pkg not in LAYERS or src_pkg not in LAYERS:
                continue
            if LAYERS[dst_pkg] >= LAYERS[src_pkg]:
                kind = "up" if LAYERS[dst_pkg] > LAYERS[src_pkg] else "sideways"
                problems.append(
                    f"{file.relative_to(root.parent)}:{line}: {mod} imports "
                    f"{target} ({kind}: {src_pkg} -> {dst_pkg})"
                )
    problems += [f"import cycle: {' -> '.join(c)}" for c in cycles(graph)]
    return problems


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected component of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in graph:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component) + [min(component)])

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_every_import_under_src_points_down_and_none_forms_a_cycle():
    problems = violations(SRC)
    assert not problems, "\n".join(problems)


def test_every_package_under_src_has_a_layer():
    packages = {package(m) for m in modules(SRC)} - {"src"}
    assert packages <= set(LAYERS), packages - set(LAYERS)


def _tree(tmp_path: Path, files: dict[str, str]) -> Path:
    root = tmp_path / "src"
    for name, text in {"__init__.py": "", **files}.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        (path.parent / "__init__.py").touch()
        path.write_text(text)
    return root


@pytest.mark.parametrize(
    "files, expected",
    [
        (
            {
                "core/trainer.py": "from src.algorithms.base import batch_size_of\n",
                "algorithms/base.py": "",
            },
            "up: core -> algorithms",
        ),
        (
            {"core/a.py": "def f():\n    import src.run.experiment\n", "run/experiment.py": ""},
            "up: core -> run",
        ),
        (
            {"data/text.py": "from src.models.hf import resolve_path\n", "models/hf.py": ""},
            "sideways: data -> models",
        ),
        (
            {
                "data/jsonl.py": "def f():\n    from src.data.docstrings import g\n",
                "data/docstrings.py": "from src.data.jsonl import Examples\n",
            },
            "import cycle",
        ),
        (
            {
                "run/main.py": "from src.run import export\n",
                "run/export.py": "from src.core import x\n",
                "core/x.py": "from src.run.export import y\n",
            },
            "up: core -> run",
        ),
    ],
)
def test_an_inverted_import_or_a_cycle_is_found(tmp_path, files, expected):
    problems = violations(_tree(tmp_path, files))
    assert any(expected in p for p in problems), problems


def test_a_clean_tree_has_no_problem(tmp_path):
    root = _tree(
        tmp_path,
        {
            "core/a.py": "",
            "data/d.py": "from src.core.a import x\n",
            "algorithms/t.py": "from src.data.d import y\nimport src.core.a\n",
            "run/r.py": "from src.algorithms import t\n",
        },
    )
    assert violations(root) == []
