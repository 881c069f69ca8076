"""The documentation's references, made from the code itself.

``components()`` is every registry and every registered component with its parameters (what
``--list`` and ``--list REGISTRY.NAME`` print); ``commands()`` is the ``--help`` of the command
line and of each of its commands. The docs site inserts both at build time
(``docs/hooks.py``), so the reference cannot drift from what the platform accepts.
"""

from __future__ import annotations

import contextlib
import io
import os
import re

from src.run.catalog import entry_doc, load_builtins, parameters, summary


def _cell(text: str) -> str:
    """Text for a table cell: one line, ``|`` escaped outside code spans (inside them the
    table reads it as text already, and an escape would show)."""
    parts = re.split(r"(`+[^`]*`+)", text.replace("\n", " "))
    return "".join(p if p.startswith("`") else p.replace("|", "\\|") for p in parts) or " "


def components() -> str:
    """Markdown: a section per registry, a table of parameters per built-in component."""
    from src.core.registry import ALL

    load_builtins()
    out = []
    for r_name, reg in ALL.items():
        names = reg.names()
        if not names:
            continue
        out += [f"## {r_name}", "", reg.doc, ""]
        if reg.injected:
            out += [
                f"Set by the platform, not by a config: `{'`, `'.join(sorted(reg.injected))}`.",
                "",
            ]
        out += ["| name | what it is |", "|---|---|"]
        docs = {n: entry_doc(reg.get(n)) for n in names}
        out += [f"| [`{n}`](#{r_name}-{n}) | {_cell(summary(docs[n]))} |" for n in names]
        out.append("")
        for n in names:
            entry, doc = reg.get(n), docs[n]
            out += [f"### {r_name}.{n} {{#{r_name}-{n}}}", "", _cell(summary(doc)), ""]
            rows = parameters(entry, doc, reg.injected, reg.field_types(n))
            if not rows:
                out += ["No parameters.", ""]
                continue
            out += ["| parameter | type | default | description |", "|---|---|---|---|"]
            out += [
                f"| `{p}` | {_cell(f'`{k}`')} | {_cell(f'`{d}`')} | {_cell(t)} |"
                for p, k, d, t in rows
            ]
            out.append("")
    return "\n".join(out)


def commands(main, names) -> str:
    """Markdown: the ``--help`` of ``python -m src.main`` and of each command in ``names``
    (``main`` is ``src.main.main``, passed in: the command line sits above this layer)."""
    out = []
    for command in ("", *names):
        argv = [command, "--help"] if command else ["--help"]
        text = io.StringIO()
        old = os.environ.get("COLUMNS")
        os.environ["COLUMNS"] = "100"  # argparse wraps to the terminal: the same page anywhere
        try:
            with contextlib.redirect_stdout(text), contextlib.suppress(SystemExit):
                main(argv)
        finally:
            if old is None:
                os.environ.pop("COLUMNS")
            else:
                os.environ["COLUMNS"] = old
        title = f"python -m src.main {command}".strip()
        out += [f"## `{title}`", "", "```text", text.getvalue().rstrip(), "```", ""]
    return "\n".join(out)
