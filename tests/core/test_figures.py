"""The run's figures (curves.png, confusion_matrix.png) are drawn with Pillow: what they show, and
that a run no longer pays matplotlib's import for them."""

import math
import subprocess
import sys

import numpy as np
import pytest
from conftest import ROOT
from PIL import Image

from src.core.figures import (
    BOTTOM,
    COLOURS,
    LEFT,
    PANEL_H,
    PANEL_W,
    RIGHT,
    TOP,
    Panel,
    Series,
    heatmap,
    heatmap_layout,
    line_panels,
    nice_ticks,
)


def _rgb(hex_colour: str) -> tuple:
    return tuple(int(hex_colour[i : i + 2], 16) for i in (1, 3, 5))


@pytest.mark.parametrize(
    "lo,hi", [(0, 1500), (3.2, 7.4), (2e-4, 1.05e-3), (-1, 1), (0.95, 0.99), (1e5, 3.3e5)]
)
def test_ticks_are_round_evenly_spaced_and_inside_the_range(lo, hi):
    ticks = nice_ticks(lo, hi)
    assert 3 <= len(ticks) <= 11
    assert all(lo - 1e-12 <= t <= hi + 1e-12 for t in ticks)
    steps = np.diff(ticks)
    assert np.allclose(steps, steps[0])
    mantissa = steps[0] / 10 ** math.floor(math.log10(steps[0]))
    assert min(abs(mantissa - m) for m in (1, 2, 2.5, 5)) < 1e-6


def test_line_panels_put_each_series_where_its_values_are(tmp_path):
    """A rising series in the first panel and a falling one (the second series, second colour)
    in the second: the data pixels sit where the values say, in the series' own colour."""
    up = Series("up", list(range(11)), [float(v) for v in range(11)])
    down = Series("down", list(range(11)), [10.0 - v for v in range(11)], markers=True)
    flat = Series("flat", [0, 10], [5.0, 5.0])
    out = line_panels(
        [Panel("a", [up]), Panel("b", [flat, down]), Panel("empty")], "title", tmp_path / "p.png"
    )
    image = np.asarray(Image.open(out).convert("RGB")).astype(int)
    assert image.shape == (PANEL_H + 24, 3 * PANEL_W, 3)
    blue, orange = _rgb(COLOURS[0]), _rgb(COLOURS[1])

    def where(colour, panel):
        x0 = panel * PANEL_W + LEFT
        box = image[24 + TOP + 30 : 24 + PANEL_H - BOTTOM, x0 : panel * PANEL_W + PANEL_W - RIGHT]
        ys, xs = np.nonzero(np.abs(box - colour).sum(-1) < 30)
        return xs, ys  # the legend (top rows of the frame) is left out

    xs, ys = where(blue, 0)
    assert len(xs) > 100
    left, right = ys[xs < xs.mean()].mean(), ys[xs > xs.mean()].mean()
    assert left > right  # rising: further right is higher (smaller row index)
    xs, ys = where(orange, 1)
    assert len(xs) > 100 and ys[xs < xs.mean()].mean() < ys[xs > xs.mean()].mean()
    assert len(where(orange, 0)[0]) == 0 and len(where(blue, 2)[0]) == 0


def test_line_panels_survive_nan_constant_and_single_points(tmp_path):
    out = line_panels(
        [
            Panel(
                "p",
                [
                    Series("nan", [0, 1, 2], [float("nan"), 1.0, float("inf")]),
                    Series("flat", [0, 5], [2.0, 2.0]),
                    Series("one", [3], [0.0]),
                ],
            )
        ],
        "t",
        tmp_path / "p.png",
    )
    assert Image.open(out).size == (PANEL_W, PANEL_H + 24)


def test_heatmap_cells_darken_with_the_count(tmp_path):
    m = [[50, 0, 5], [0, 20, 0], [10, 0, 40]]
    out = heatmap(m, ["a", "b", "c"], "cm", tmp_path / "cm.png")
    image = np.asarray(Image.open(out).convert("L")).astype(int)
    cell, left, top, _ = heatmap_layout(3, ["a", "b", "c"])
    corner = {
        m[i][j]: image[top + i * cell + 2, left + j * cell + 2] for i in range(3) for j in range(3)
    }  # a cell's corner: clear of its number
    values = sorted(corner)
    assert [corner[v] for v in values] == sorted(corner.values(), reverse=True)
    assert corner[0] > 240 and corner[50] < 80  # empty cells white, the largest dark


def test_a_run_draws_its_figures_without_matplotlib(tmp_path):
    from conftest import make_config

    cfg = make_config(tmp_path, {"trainer.eval_every_n_steps": 10})
    code = (
        "import sys; from src.run.experiment import build, prepare; "
        f"cfg, o = prepare({str(cfg)!r}, []); build(cfg, o).run(); "
        "print('matplotlib' in sys.modules)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "False"
    for name in ("curves.png", "confusion_matrix.png"):
        image = np.asarray(Image.open(tmp_path / "runs/tiny" / name).convert("RGB"))
        assert image.std() > 10, name


def test_the_legend_sits_in_a_corner_the_lines_leave_free(tmp_path):
    """An accuracy-like curve runs along the top of the frame: the legend goes below it, as
    matplotlib's ``loc="best"`` would put it, instead of over the curve."""
    x = list(range(50))
    acc = Series("train/accuracy", x, [0.5] + [1.0] * 49)
    out = line_panels([Panel("accuracy", [acc])], "t", tmp_path / "p.png")
    image = np.asarray(Image.open(out).convert("RGB")).astype(int)
    frame = image[24 + TOP + 2 : 24 + PANEL_H - BOTTOM - 2, LEFT + 2 : PANEL_W - RIGHT - 2]
    ink = np.abs(frame - 30).sum(-1) < 60  # the legend's text colour
    rows = np.nonzero(ink)[0]
    assert len(rows) > 20 and rows.min() > frame.shape[0] / 2
