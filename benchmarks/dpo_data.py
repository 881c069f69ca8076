"""Preference pairs from the standard library: prompt = a function's signature and the opening of
its docstring, chosen = the function's own docstring line, rejected = another function's.

    python -m benchmarks.dpo_data experiments/dpo_docstrings.jsonl
"""
from __future__ import annotations

import json
import random
import sys
from pathlib import Path

from src.data.docstrings import public_functions

def functions() -> list[tuple[str, str]]:
    """(prompt, first docstring line) of public functions with a one-line summary."""
    return [(header + '\n    """', doc.splitlines()[0]) for header, doc in public_functions()
            if doc and 20 <= len(doc.splitlines()[0]) <= 120]


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
