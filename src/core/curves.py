"""``curves.png``: the curves people look at first, drawn at the end of a run from metrics.jsonl
(with Pillow: :mod:`src.core.figures`).

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
    return next(
        (k for k in ("val/accuracy", "val/zeroshot_top1") if k in keys), keys[0] if keys else None
    )


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
    from src.core.figures import Panel, Series, line_panels

    metric = main_metric(rows)
    groups = [("loss", ["train/loss", "val/loss"])]
    if metric:
        groups.append((metric.split("/", 1)[1], [metric.replace("val/", "train/", 1), metric]))
    groups.append(("learning rate", ["train/lr"]))
    panels = [
        Panel(
            title,
            [Series(key, *_series(rows, key), markers=key.startswith("val/")) for key in keys],
        )
        for title, keys in groups
    ]  # empty ones not drawn
    return line_panels(panels, Path(run_dir).name, Path(run_dir) / "curves.png")
