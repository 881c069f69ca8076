"""The built-in components: where they are, and their names without importing them.

A built-in component is a file in one of ``BUILTINS``' packages that registers itself with a
decorator, plus its name in that package's ``__init__`` (``from src.models import cnn, hf, ...``);
``src.core.optim`` and ``src.core.loggers`` are single modules that register several entries.
``load_builtins()`` imports ``BUILTINS``; ``builtin_names()`` reads the very same files with
``ast`` (the package ``__init__`` names which) and finds each ``REGISTRY.register("name")``, so
``--list`` answers without importing torch.
"""

from __future__ import annotations

import ast
import importlib
import re
import typing
from pathlib import Path

BUILTINS = (
    "src.core.optim",
    "src.core.loggers",
    "src.core.callbacks",
    "src.data",
    "src.models",
    "src.distributed",
    "src.algorithms",
)

_ROOT = Path(__file__).resolve().parents[2]


def summary(doc: str) -> str:
    """The first sentence of a docstring's first paragraph (what ``--list`` shows)."""
    para = []
    for line in (doc or "").strip().splitlines():
        if not line.strip() or line.strip().endswith(":") and line.strip()[:-1].isalpha():
            break  # a blank line or a section header (Args:, Example:)
        para.append(line.strip())
    text = " ".join(para)
    m = re.search(r"(?<=[.!?])\s(?=[A-Z(`])", text)
    return text[: m.start()] if m else text


def entry_doc(entry) -> str:
    """A registered component's docstring: the class's, else its ``__init__``'s."""
    import inspect

    doc = inspect.getdoc(entry) or ""
    if inspect.isclass(entry) and not doc.strip():
        doc = inspect.getdoc(entry.__init__) or ""
    return doc


_BOUNDS = (("gt", ">"), ("ge", ">="), ("lt", "<"), ("le", "<="))


def type_name(ann) -> str:
    """A parameter's type as a person reads it: ``int >0``, ``list[int >0]``, ``str | None``."""
    origin, args = typing.get_origin(ann), typing.get_args(ann)
    if origin is typing.Annotated:
        bounds = [
            f"{sym}{getattr(m, attr)}"
            for m in args[1:]
            for attr, sym in _BOUNDS
            if getattr(m, attr, None) is not None
        ]
        return " ".join([type_name(args[0]), *bounds])
    if origin is typing.Literal:
        return " | ".join(repr(a) for a in args)
    if args and (origin is typing.Union or type(ann).__name__ == "UnionType"):
        return " | ".join(type_name(a) for a in args)
    if args and origin is not None:
        return f"{getattr(origin, '__name__', str(origin))}[{', '.join(map(type_name, args))}]"
    if ann is type(None):
        return "None"
    return getattr(ann, "__name__", str(ann).replace("typing.", ""))


def parameters(entry, doc: str, skip=(), field_types=None) -> list[tuple[str, str, str, str]]:
    """(name, type, default, description) of each parameter a config may set.

    A description lives next to its parameter (``Annotated[float, Field(description=...)]``);
    for classes we do not own (torch's optimizers) it comes from the docstring's ``Args:``
    section (``lr (float, optional): learning rate``)."""
    from src.core.registry import params_model

    described: dict[str, str] = {}
    item_indent, current = None, None  # the indent of the Args: items, once inside the section
    for line in (doc or "").splitlines():
        stripped = line.strip()
        indent = len(line) - len(line.lstrip())
        if stripped in ("Args:", "Arguments:", "Parameters:"):
            item_indent = -1
            continue
        if item_indent is None or not stripped:
            continue
        if item_indent == -1:
            item_indent = indent
        if indent < item_indent:  # the section ended
            item_indent = current = None
            continue
        m = re.match(r"([\w, ]+?)(?:\s*\(.*\))?:(?:\s+(.*))?$", stripped)
        if m and indent == item_indent:
            current = [n.strip() for n in m.group(1).split(",")]
            for n in current:
                described[n] = m.group(2) or ""
        elif current:
            for n in current:
                described[n] = (described[n] + " " + stripped).strip()
    out = []
    for name, field in params_model(entry, skip, field_types).model_fields.items():
        kind = type_name(field.annotation)
        if field.metadata:  # constraints pydantic lifted out of Annotated[...]
            args = (field.annotation, *field.metadata)
            kind = type_name(typing.Annotated[args])
        default = "required" if field.is_required() else repr(field.default)
        out.append((name, kind, default, field.description or described.get(name, "")))
    return out


def load_builtins() -> None:
    for name in BUILTINS:
        importlib.import_module(name)


def _module_files(name: str) -> list[Path]:
    """The files ``import name`` imports: the module, or a package's ``__init__`` and the
    modules it imports by name (``from src.data import digits, text``)."""
    path = _ROOT.joinpath(*name.split("."))
    if not path.is_dir():
        return [path.with_suffix(".py")]
    init = path / "__init__.py"
    files = [init]
    for node in ast.parse(init.read_text(), str(init)).body:
        if isinstance(node, ast.ImportFrom) and node.module == name:
            files += [f for a in node.names if (f := path / f"{a.name}.py").is_file()]
    return files


def _tuple_constants(tree: ast.Module) -> dict[str, list[str]]:
    """Module-level ``NAME = ("a", "b", ...)`` assignments of string literals."""
    out: dict[str, list[str]] = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and isinstance(node.value, (ast.Tuple, ast.List)):
            values = [e.value for e in node.value.elts if isinstance(e, ast.Constant)]
            if values and all(isinstance(v, str) for v in values):
                for target in node.targets:
                    if isinstance(target, ast.Name):
                        out[target.id] = [str(v) for v in values]
    return out


def _registrations(tree: ast.Module) -> list[tuple[str, str, str]]:
    """(REGISTRY variable, name, first docstring line) for each ``X.register(...)`` call."""
    consts = _tuple_constants(tree)
    loops: dict[str, list[str]] = {}  # loop variable -> names it runs over
    for node in ast.walk(tree):
        if isinstance(node, ast.For) and isinstance(node.target, ast.Tuple):
            # `for a, b in f().items(): if a in CONST:` -> CONST's names
            for inner in ast.walk(node):
                if (
                    isinstance(inner, ast.Compare)
                    and isinstance(inner.left, ast.Name)
                    and any(isinstance(c, ast.Name) and c.id in consts for c in inner.comparators)
                ):
                    const = next(
                        c.id
                        for c in inner.comparators
                        if isinstance(c, ast.Name) and c.id in consts
                    )
                    loops[inner.left.id] = consts[const]
        elif (
            isinstance(node, ast.For)
            and isinstance(node.target, ast.Name)
            and isinstance(node.iter, ast.Name)
            and node.iter.id in consts
        ):
            loops[node.target.id] = consts[node.iter.id]
    found = []
    for node in ast.walk(tree):
        targets = []
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            doc = summary(ast.get_docstring(node) or "")
            targets = [(d, doc) for d in node.decorator_list]
        elif (
            isinstance(node, ast.Expr)
            and isinstance(node.value, ast.Call)
            and isinstance(node.value.func, ast.Call)
        ):
            targets = [(node.value.func, "")]
        for call, doc in targets:
            if not (
                isinstance(call, ast.Call)
                and isinstance(call.func, ast.Attribute)
                and call.func.attr == "register"
                and isinstance(call.func.value, ast.Name)
                and call.args
            ):
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
    for module in BUILTINS:
        for f in _module_files(module):
            tree = ast.parse(f.read_text(), str(f))
            for var, name, doc in _registrations(tree):
                if var in by_var:
                    out[by_var[var]][name] = doc
    return out
