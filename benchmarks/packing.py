"""Packing for fine-tuning: tokens/s of one epoch of instruction data, packed against padded.

The data: "Write the function NAME of MODULE." -> the function's source, for every function of a
few standard-library packages (lengths long-tailed, as instruction data is: most short, a few
long), cut at ``max_length``. A BPE trained on the json package reads it. Each variant trains a
2-layer GPT for one epoch in a fresh process, alternating (padded, packed, padded, ...); tokens
are real tokens (no padding) in both, so tokens/s compare directly.
"""

from __future__ import annotations

import ast
import json
import os
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("json", "email", "http", "urllib", "logging")


def write_data(path: Path, packages=PACKAGES) -> int:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    rows = []
    for pkg in packages:
        for f in sorted((stdlib / pkg).rglob("*.py")):
            src = f.read_text(encoding="utf-8", errors="replace")
            for node in ast.walk(ast.parse(src)):
                if isinstance(node, ast.FunctionDef):
                    code = ast.get_source_segment(src, node) or ""
                    mod = ".".join(f.relative_to(stdlib).with_suffix("").parts)
                    rows.append({"instruction": f"Write the function {node.name} of {mod}.",
                                 "output": code})  # fmt: skip
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return len(rows)


def _run(cfg: Path, packing: bool, out: Path) -> dict:
    name = f"{'packed' if packing else 'padded'}-{time.monotonic_ns()}"
    t0 = time.perf_counter()
    subprocess.run(
        [
            sys.executable,
            "-m",
            "src.main",
            "--config",
            str(cfg),
            f"name={name}",
            f"logging.root={out}",
            f"data.packing={str(packing).lower()}",
        ],  # fmt: skip
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        check=True,
        capture_output=True,
    )
    wall = time.perf_counter() - t0
    rows = [json.loads(x) for x in (out / name / "metrics.jsonl").read_text().splitlines()]
    rates = [r["train/tokens_per_sec"] for r in rows if "train/tokens_per_sec" in r]
    rates = rates[1:] or rates  # the first interval holds the first step's warm-up
    steps = max(r["step"] for r in rows)
    return {"tokens_per_sec": statistics.median(rates), "wall": wall, "steps": steps}


def measure(pairs: int = 3, quick: bool = False) -> dict:
    from src.data.text import resolve_files, train_tokenizer

    tmp = Path(tempfile.mkdtemp(prefix="bench-packing-"))
    n = write_data(tmp / "sft.jsonl", PACKAGES[:1] if quick else PACKAGES)
    train_tokenizer(resolve_files(["stdlib:json"]), 2000).save_pretrained(str(tmp / "tok"))
    cfg = {
        "name": "packing",
        "seed": 0,
        "data": {
            "type": "instructions",
            "path": str(tmp / "sft.jsonl"),
            "tokenizer": str(tmp / "tok"),
            "max_length": 256,
            "val_fraction": 0.0,
            "batch_size": 16,
        },  # fmt: skip
        "model": {
            "type": "hf",
            "kind": "causal_lm",
            "config": {
                "model_type": "gpt2",
                "n_layer": 2,
                "n_head": 4,
                "n_embd": 128,
                "n_positions": 256,
            },
        },  # fmt: skip
        "task": {"type": "causal_lm", "samples": 0},
        "optimizer": {"type": "adamw", "lr": 1e-3},
        "trainer": {"max_epochs": 1, "log_every": 2, "eval_every_n_epochs": None},
        "checkpoint": {"save_last": False},
        "logging": {"loggers": ["jsonl"]},
    }
    (tmp / "c.yaml").write_text(json.dumps(cfg))
    res: dict = {"padded": [], "packed": [], "examples": n}
    for _ in range(pairs):
        for packing in (False, True):
            res["packed" if packing else "padded"].append(_run(tmp / "c.yaml", packing, tmp))
    return res


def section(res: dict) -> list[str]:
    def med(variant: str, key: str) -> float:
        return statistics.median(r[key] for r in res[variant])

    ratios = [
        b["tokens_per_sec"] / a["tokens_per_sec"] for a, b in zip(res["padded"], res["packed"])
    ]
    return (
        [
            f"One epoch of {res['examples']:,} instruction examples (standard-library functions: "
            "'Write the function NAME of MODULE.' -> its source, long-tailed lengths, cut at 256 "
            "tokens), a 2-layer GPT 128 wide, batch 16, alternating fresh processes. Tokens are real "
            "tokens in both (padding is not counted). Goal: packed faster than padded.",
            "",
            "| variant | optimizer steps | tokens/s (median) | process s (median) |",
            "|---|---|---|---|",
        ]
        + [
            f"| {v} | {res[v][0]['steps']} | {med(v, 'tokens_per_sec'):,.0f} | {med(v, 'wall'):.1f} |"
            for v in ("padded", "packed")
        ]
        + [
            "",
            f"Packed / padded tokens/s per pair: {' / '.join(f'{r:.2f}' for r in sorted(ratios))} "
            "(min / ... / max).",
        ]
    )


if __name__ == "__main__":
    quick = "--quick" in sys.argv
    r = measure(1 if quick else 3, quick)
    print("\n".join(section(r)))
