"""The shipped sweep (configs/sweep_exp001.yaml: 24 TPE trials of the digits CNN) with and without
its Hyperband pruner, with 1 and 2 worker processes.

    python -m benchmarks.sweep                    # the four sweeps; prints the section
    python -m benchmarks.sweep --quick            # 4 trials of 20 steps each (what CI runs)

Each sweep runs as the docs show it (``python -m src.main sweep --config ...``) into a fresh
folder, timed whole; its trials.csv gives the states, the best value and the steps trained.
"""

from __future__ import annotations

import argparse
import csv
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "sweep_exp001.yaml"
METRIC = "val/accuracy"


def run_sweep(root: Path, pruner: str, workers: int, extra: list[str] = ()) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [
        sys.executable,
        "-m",
        "src.main",
        "sweep",
        "--config",
        str(CONFIG),
        f"logging.root={root}",
        f"pruner.type={pruner}",
        "--workers",
        str(workers),
        *extra,
    ]
    t0 = time.perf_counter()
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    with open(root / "sweep_exp001" / "trials.csv") as f:
        rows = list(csv.DictReader(f))
    complete = [float(r[METRIC]) for r in rows if r["state"] == "complete"]
    return {
        "pruner": pruner,
        "workers": workers,
        "trials": len(rows),
        "pruned": sum(r["state"] == "pruned" for r in rows),
        "failed": sum(r["state"] == "failed" for r in rows),
        "steps": sum(int(r["steps"] or 0) for r in rows),
        "best": max(complete),
        "wall_s": wall,
    }


def measure(quick: bool = False) -> list[dict]:
    extra = (
        [
            "trials=4",
            "trainer.max_steps=20",
            "trainer.max_epochs=null",
            "trainer.eval_every_n_steps=10",
        ]
        if quick
        else []
    )
    runs = (
        [("hyperband", 1), ("none", 1)]
        if quick
        else [("hyperband", 1), ("none", 1), ("hyperband", 2), ("none", 2)]
    )
    out = []
    for pruner, workers in runs:
        with tempfile.TemporaryDirectory() as tmp:
            out.append(run_sweep(Path(tmp), pruner, workers, extra))
    return out


def section(results: list[dict]) -> list[str]:
    body = [
        "`configs/sweep_exp001.yaml`: 24 TPE trials (seed 0) of exp001's CNN on digits, 15 epochs "
        "each, over lr, weight decay, dropout and batch size; `val/accuracy` after the last "
        "epoch. `pruner.type=none` is the same sweep without pruning. Whole-command wall time. "
        "Goals: best >= 0.97; with the pruner >= 40% of trials pruned, fewer than half the "
        "training steps, best within 0.01 of the unpruned sweep.",
        "",
        "| pruner | workers | trials | pruned | failed | training steps | best val/accuracy | "
        "wall s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        body.append(
            f"| {r['pruner']} | {r['workers']} | {r['trials']} | {r['pruned']} "
            f"({100 * r['pruned'] / r['trials']:.0f}%) | {r['failed']} | {r['steps']:,} | "
            f"{r['best']:.4f} | {r['wall_s']:.0f} |"
        )
    by = {(r["pruner"], r["workers"]): r for r in results}
    pruned, full = by.get(("hyperband", 1)), by.get(("none", 1))
    if pruned and full:
        body += [
            "",
            f"One worker: the pruned sweep trains {pruned['steps'] / full['steps']:.2f}x "
            f"the steps of the unpruned one, in {pruned['wall_s'] / full['wall_s']:.2f}x the "
            f"time; best {pruned['best']:.4f} against {full['best']:.4f} "
            f"(difference {pruned['best'] - full['best']:+.4f}).",
        ]
    two = by.get(("none", 2))
    if two and full:
        body.append(
            f"Two workers (no pruner) take {two['wall_s'] / full['wall_s']:.2f}x the wall "
            "time of one on this machine (2 cores: each worker's trials get one core)."
        )
    return body


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    args = p.parse_args(argv)
    print("\n".join(section(measure(args.quick))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
