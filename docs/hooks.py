"""Build-time hook of the docs site: the reference pages are made from the code.

A page that holds ``<!-- generated: components -->`` gets every registry and component with its
parameters; ``<!-- generated: commands -->`` the ``--help`` of every command (both from
``src.run.reference``, which reads the registries and the argument parsers themselves);
``<!-- generated: results -->`` and ``<!-- generated: gpu_results -->`` the recorded benchmark
figures, ``benchmarks/RESULTS.md`` and ``benchmarks/GPU_RESULTS.md``, as they are committed.
"""

from __future__ import annotations

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Imported now, while this checkout is first on the path: MkDocs restores sys.path once the hook
# is loaded, and a later import could find another installed copy of the platform.
sys.path.insert(0, ROOT)
from src.main import COMMANDS, main  # noqa: E402
from src.run import reference  # noqa: E402


def _recorded(name: str) -> str:
    """A benchmark results file without its title, headings one level down."""
    with open(os.path.join(ROOT, "benchmarks", name), encoding="utf-8") as f:
        lines = f.read().splitlines()[1:]
    return "\n".join("#" + line if line.startswith("#") else line for line in lines)


def on_page_markdown(markdown: str, page, config, files) -> str:
    if "<!-- generated: components -->" in markdown:
        markdown = markdown.replace("<!-- generated: components -->", reference.components())
    if "<!-- generated: commands -->" in markdown:
        text = reference.commands(main, COMMANDS)
        markdown = markdown.replace("<!-- generated: commands -->", text)
    if "<!-- generated: results -->" in markdown:
        markdown = markdown.replace("<!-- generated: results -->", _recorded("RESULTS.md"))
    if "<!-- generated: gpu_results -->" in markdown:
        text = _recorded("GPU_RESULTS.md").replace("\n#", "\n###")
        markdown = markdown.replace("<!-- generated: gpu_results -->", text)
    return markdown
