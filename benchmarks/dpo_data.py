"""Preference pairs from the standard library on a documented style choice: Google's Python style
guide asks for docstrings that are "descriptive-style ("Fetches rows from a Bigtable.") rather
than imperative-style ("Fetch rows from a Bigtable.")", where the standard library follows PEP 257's
imperative ("Return that"). Prompt: a function's signature and the opening of its docstring;
chosen: its own summary line with the opening verb in the third person ("Returns the ..."),
rejected: the line as the standard library wrote it ("Return the ..."). A GPT trained on the
standard library starts out preferring the rejected style; DPO is to move it to the chosen one on
functions it was not trained on.

The first version paired a function's docstring with another function's (of any length): there
the summed log-probability of an answer is decided by its length (the policy preferred the shorter
answer in 93% of held-out pairs whose chosen answer was shorter and in 13% of the others, with a
mean gap of 29 nats against a DPO margin of 1.5), so no preference training moved which answer
the policy prefers. Here the two answers differ by a token or two, in a way that holds for every
function.

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
    return [
        (header + '\n    """', doc.splitlines()[0])
        for header, doc in public_functions()
        if doc and 20 <= len(doc.splitlines()[0]) <= 120
    ]


VERBS = {
    "Return",
    "Parse",
    "Set",
    "Encode",
    "Add",
    "Send",
    "Get",
    "Log",
    "Configure",
    "Read",
    "Decode",
    "Determine",
    "Delegate",
    "Remove",
    "Create",
    "Do",
    "Handle",
    "Format",
    "Serve",
    "Convert",
    "Turn",
    "Prepare",
    "Push",
    "Iterate",
    "Make",
    "Build",
    "Compute",
    "Check",
    "Write",
    "Find",
    "Open",
    "Close",
    "Call",
    "Run",
    "Process",
    "Split",
    "Join",
    "Copy",
    "Update",
    "Reset",
    "Start",
    "Stop",
    "Test",
    "Print",
    "Load",
    "Save",
    "Register",
}


def third_person(verb: str) -> str:
    """Return -> Returns, Push -> Pushes, Do -> Does."""
    return verb + ("es" if verb.endswith(("s", "sh", "ch", "x", "z", "o")) else "s")


def write_pairs(path: Path, seed: int = 0, limit: int = 400) -> int:
    """Up to ``limit`` pairs: every summary line that opens with one of ``VERBS``, chosen in the
    third person, rejected as written."""
    rng = random.Random(seed)
    funcs = [(p, d) for p, d in functions() if d.partition(" ")[0] in VERBS and " " in d]
    rng.shuffle(funcs)
    rows = []
    for prompt, doc in funcs[:limit]:
        verb, _, rest = doc.partition(" ")
        rows.append(
            {
                "prompt": prompt,
                "chosen": f"{third_person(verb)} {rest}" + '"""',
                "rejected": doc + '"""',
            }
        )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return len(rows)


if __name__ == "__main__":
    print(f"wrote {write_pairs(Path(sys.argv[1]))} pairs to {sys.argv[1]}")
