"""Preference pairs from the standard library: prompt = a function's signature and the opening of
its docstring, chosen = the function's own docstring line, rejected = another function's.

    python -m benchmarks.dpo_data experiments/dpo_docstrings.jsonl
"""
from __future__ import annotations

import ast
import json
import random
import sys
from pathlib import Path

from src.data.text import read, resolve_files

PACKAGES = ("json", "email", "http", "urllib", "logging", "csv", "textwrap", "string")


def functions(packages=PACKAGES) -> list[tuple[str, str]]:
    out = []
    for f in resolve_files([f"stdlib:{p}" for p in packages]):
        try:
            tree = ast.parse(read(f))
        except SyntaxError:
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef) and not node.name.startswith("_"):
                doc = ast.get_docstring(node)
                if doc and 20 <= len(doc.splitlines()[0]) <= 120:
                    args = ", ".join(a.arg for a in node.args.args)
                    out.append((f"def {node.name}({args}):\n    \"\"\"", doc.splitlines()[0]))
    return out


def write_pairs(path: Path, seed: int = 0, limit: int = 400) -> int:
    rng = random.Random(seed)
    funcs = functions()
    rng.shuffle(funcs)
    funcs = funcs[:limit]
    rows = []
    for i, (prompt, doc) in enumerate(funcs):
        other = funcs[(i + 1 + rng.randrange(len(funcs) - 1)) % len(funcs)][1]
        rows.append({"prompt": prompt, "chosen": doc + '"""', "rejected": other + '"""'})
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return len(rows)


if __name__ == "__main__":
    print(f"wrote {write_pairs(Path(sys.argv[1]))} pairs to {sys.argv[1]}")
