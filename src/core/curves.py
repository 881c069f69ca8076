"""``curves.png``: the curves people look at first, drawn at the end of a run from metrics.jsonl.

Three panels against the step: training and validation loss, the main validation metric (the
first ``val/`` metric that is not a loss, e.g. ``val/accuracy``), and the learning rate.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional


def _series(rows: list[dict], key: str) -> tuple[list[int], list[float]]:
    pts = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
    return [p[0] for p in pts], [p[1] for p in pts]


def main_metric(rows: list[dict]) -> Optional[str]:
    keys = [k for r in rows for k in r if k.startswith("val/") and "loss" not in k]
    return next((k for k in ("val/accuracy", "val/zeroshot_top1") if k in keys), keys[0]
                if keys else None)


def write_curves(run_dir: Path) -> Optional[Path]:
    """Draw ``run_dir/curves.png`` from ``run_dir/metrics.jsonl``; None when there is nothing
    to draw (no jsonl logger, or no step logged)."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return None
    rows = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), int):
            rows.append(row)
    if not rows:
        return None
    from matplotlib.figure import Figure  # no pyplot: no backend, no global state

    metric = main_metric(rows)
    panels = [("loss", ["train/loss", "val/loss"])]
    if metric:
        panels.append((metric.split("/", 1)[1], [metric.replace("val/", "train/", 1), metric]))
    panels.append(("learning rate", ["train/lr"]))
    fig = Figure(figsize=(4.2 * len(panels), 3.4))
    axes = fig.subplots(1, len(panels))
    fig.subplots_adjust(left=0.06, right=0.98, bottom=0.15, top=0.84, wspace=0.28)
    for ax, (title, keys) in zip(axes, panels):
        for key in keys:
            x, y = _series(rows, key)
            if x:
                ax.plot(x, y, marker="o" if key.startswith("val/") else None, markersize=3,
                        label=key)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.suptitle(Path(run_dir).name, fontsize=10)
    out = Path(run_dir) / "curves.png"
    fig.savefig(out, dpi=80)
    return out
