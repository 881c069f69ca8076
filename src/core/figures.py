"""The two figures every run writes, drawn with Pillow: line panels (``curves.png``) and a
heatmap (``confusion_matrix.png``).

Importing matplotlib costs about half a second, which every short run and every test paid for two
simple figures; Pillow (already installed with torchvision) draws both in about 0.1 s.
Figures drawn on request (the lr finder, sweep reports) keep matplotlib.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

# matplotlib's tab10, so the figures look like the ones people know
COLOURS = [
    "#1f77b4",
    "#ff7f0e",
    "#2ca02c",
    "#d62728",
    "#9467bd",
    "#8c564b",
    "#e377c2",
    "#7f7f7f",
    "#bcbd22",
    "#17becf",
]
INK, GRID, FRAME = (30, 30, 30), (225, 225, 225), (110, 110, 110)
PANEL_W, PANEL_H = 380, 300
LEFT, RIGHT, TOP, BOTTOM = 58, 14, 30, 40


@dataclass
class Series:
    label: str
    x: Sequence[float]
    y: Sequence[float]
    markers: bool = False


@dataclass
class Panel:
    title: str
    series: list[Series] = field(default_factory=list)
    xlabel: str = "step"


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size)  # a scalable font (Pillow >= 10.1 with FreeType)
    except (TypeError, OSError, ImportError):
        return ImageFont.load_default()


def nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    """About ``n`` round tick values (1, 2, 2.5 or 5 times a power of ten apart) in [lo, hi]."""
    if not (math.isfinite(lo) and math.isfinite(hi)) or hi <= lo:
        return [lo]
    raw = (hi - lo) / n
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    first = math.ceil(lo / step - 1e-9) * step
    ticks = []
    k = 0
    while first + k * step <= hi + step * 1e-9:
        ticks.append(round(first + k * step, 12))
        k += 1
    return ticks


def _label(v: float) -> str:
    if v == 0:
        return "0"
    return f"{v:.4g}".replace("e-0", "e-").replace("e+0", "e").replace("e+", "e")


def _limits(values: list[float]) -> tuple[float, float]:
    lo, hi = min(values), max(values)
    if hi == lo:
        pad = abs(lo) * 0.05 or 0.5
        return lo - pad, hi + pad
    pad = (hi - lo) * 0.04
    return lo - pad, hi + pad


def _text(draw, xy, text, font, anchor="la", fill=INK):
    try:
        draw.text(xy, text, font=font, fill=fill, anchor=anchor)
    except ValueError:  # the bitmap fallback font takes no anchor
        draw.text(xy, text, font=font, fill=fill)


def _draw_panel(draw, ox: int, oy: int, panel: Panel, font, small) -> None:
    x0, y0 = ox + LEFT, oy + TOP
    x1, y1 = ox + PANEL_W - RIGHT, oy + PANEL_H - BOTTOM
    _text(draw, ((x0 + x1) // 2, oy + 8), panel.title, font, "mt")
    _text(draw, ((x0 + x1) // 2, oy + PANEL_H - 4), panel.xlabel, small, "md")
    series = [
        (
            i,
            s,
            [
                (float(a), float(b))
                for a, b in zip(s.x, s.y)
                if math.isfinite(float(a)) and math.isfinite(float(b))
            ],
        )
        for i, s in enumerate(panel.series)
    ]
    series = [t for t in series if t[2]]
    draw.rectangle([x0, y0, x1, y1], outline=FRAME)
    if not series:
        _text(draw, ((x0 + x1) // 2, (y0 + y1) // 2), "no data", small, "mm", FRAME)
        return
    xlo, xhi = _limits([p[0] for _, _, pts in series for p in pts])
    ylo, yhi = _limits([p[1] for _, _, pts in series for p in pts])

    def px(x: float, y: float) -> tuple[float, float]:
        return (x0 + (x - xlo) / (xhi - xlo) * (x1 - x0), y1 - (y - ylo) / (yhi - ylo) * (y1 - y0))

    for t in nice_ticks(xlo, xhi):
        if xlo <= t <= xhi:
            x = px(t, ylo)[0]
            draw.line([(x, y0 + 1), (x, y1 - 1)], fill=GRID)
            draw.line([(x, y1), (x, y1 + 4)], fill=FRAME)
            _text(draw, (x, y1 + 6), _label(t), small, "mt")
    for t in nice_ticks(ylo, yhi):
        if ylo <= t <= yhi:
            y = px(xlo, t)[1]
            draw.line([(x0 + 1, y), (x1 - 1, y)], fill=GRID)
            draw.line([(x0 - 4, y), (x0, y)], fill=FRAME)
            _text(draw, (x0 - 6, y), _label(t), small, "rm")
    drawn = []  # the pixels the lines pass through, to keep the legend off them
    for i, s, pts in series:
        colour = COLOURS[i % len(COLOURS)]
        xy = [px(*p) for p in pts]
        if len(xy) > 1:
            draw.line(xy, fill=colour, width=2, joint="curve")
        if s.markers or len(xy) == 1:
            for cx, cy in xy:
                draw.ellipse([cx - 3, cy - 3, cx + 3, cy + 3], fill=colour)
        drawn += _along(xy)
    lw = max(int(draw.textlength(s.label, font=small)) for _, s, _ in series) + 30
    lh = 15 * len(series) + 4
    corners = [
        (x1 - lw - 4, y0 + 4),
        (x0 + 4, y0 + 4),
        (x1 - lw - 4, y1 - lh - 4),
        (x0 + 4, y1 - lh - 4),
    ]  # as matplotlib's "best": the corner the lines avoid
    lx, ly = min(
        corners,
        key=lambda c: sum(c[0] <= x <= c[0] + lw and c[1] <= y <= c[1] + lh for x, y in drawn),
    )
    for i, s, _ in series:
        draw.line([(lx + 4, ly + 8), (lx + 20, ly + 8)], fill=COLOURS[i % len(COLOURS)], width=2)
        _text(draw, (lx + 24, ly + 8), s.label, small, "lm")
        ly += 15


def _along(xy: list[tuple[float, float]], every: float = 3.0) -> list[tuple[float, float]]:
    """Points every few pixels along a polyline (its vertices included)."""
    out = list(xy[:1])
    for (ax, ay), (bx, by) in zip(xy, xy[1:]):
        n = max(1, int(math.hypot(bx - ax, by - ay) / every))
        out += [(ax + (bx - ax) * k / n, ay + (by - ay) * k / n) for k in range(1, n + 1)]
    return out


def line_panels(panels: list[Panel], title: str, out: Path) -> Path:
    """Side-by-side line charts with a common title, written as a PNG."""
    from PIL import Image, ImageDraw

    font, small = _font(13), _font(11)
    image = Image.new("RGB", (PANEL_W * len(panels), PANEL_H + 24), "white")
    draw = ImageDraw.Draw(image)
    _text(draw, (image.width // 2, 4), title, font, "mt")
    for k, panel in enumerate(panels):
        _draw_panel(draw, k * PANEL_W, 24, panel, font, small)
    image.save(out)
    return Path(out)


def _blues(v: float) -> tuple[int, int, int]:
    """White to dark blue (matplotlib's Blues end points), v in [0, 1]."""
    lo, hi = (247, 251, 255), (8, 48, 107)
    r, g, b = (round(a + (z - a) * v) for a, z in zip(lo, hi))
    return r, g, b


def heatmap_layout(c: int, names: Sequence[str]) -> tuple[int, int, int, int]:
    """(cell side, left and top of the first cell, widest name) of a c x c heatmap, in pixels."""
    from PIL import Image, ImageDraw

    cell = max(6, min(36, 720 // max(c, 1)))
    small = _font(10 if cell < 30 else 11)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    name_w = max([int(probe.textlength(n, font=small)) for n in names] + [8])
    return cell, 30 + (name_w + 8 if cell >= 10 else 0), 30, name_w


def heatmap(
    matrix: Sequence[Sequence[float]],
    names: Sequence[str],
    title: str,
    out: Path,
    xlabel: str = "predicted",
    ylabel: str = "true",
) -> Path:
    """A square matrix as coloured cells (counts written in them up to 30 classes), rows
    ``ylabel`` and columns ``xlabel`` named by ``names``; written as a PNG."""
    from PIL import Image, ImageDraw

    c = len(matrix)
    names = [str(n) for n in names[:c]] + [str(i) for i in range(len(names), c)]
    cell, left, top, name_w = heatmap_layout(c, names)
    font, small = _font(13), _font(10 if cell < 30 else 11)
    show_names = cell >= 10
    upright = name_w <= cell - 4  # column names fit their cells without turning
    bottom = 30 + (0 if not show_names else 18 if upright else name_w + 8)
    w, h = left + c * cell + 16, top + c * cell + bottom
    image = Image.new("RGB", (max(w, 240), h), "white")
    draw = ImageDraw.Draw(image)
    _text(draw, (image.width // 2, 6), title, font, "mt")
    peak = max([max(row) for row in matrix] + [1e-12])
    for i, row in enumerate(matrix):
        for j, v in enumerate(row):
            fill = _blues(v / peak)
            box = [
                left + j * cell,
                top + i * cell,
                left + (j + 1) * cell - 1,
                top + (i + 1) * cell - 1,
            ]
            draw.rectangle(box, fill=fill)
            if c <= 30 and cell >= 14:
                _text(
                    draw,
                    (box[0] + cell / 2, box[1] + cell / 2),
                    f"{v:g}",
                    small,
                    "mm",
                    (255, 255, 255) if v > peak / 2 else (0, 0, 0),
                )
    draw.rectangle([left - 1, top - 1, left + c * cell, top + c * cell], outline=FRAME)
    if show_names:
        for i, n in enumerate(names):
            _text(draw, (left - 6, top + i * cell + cell / 2), n, small, "rm")
            if upright:
                _text(draw, (left + i * cell + cell / 2, top + c * cell + 6), n, small, "mt")
                continue
            label = Image.new("RGB", (name_w + 2, cell), "white")  # column names, turned 90°
            _text(ImageDraw.Draw(label), (name_w, cell / 2), n, small, "rm")
            image.paste(label.rotate(90, expand=True), (left + i * cell, top + c * cell + 4))
    _text(draw, (left + c * cell / 2, h - 6), xlabel, small, "md")
    side = Image.new("RGB", (c * cell, 16), "white")
    _text(ImageDraw.Draw(side), (c * cell / 2, 8), ylabel, small, "mm")
    image.paste(side.rotate(90, expand=True), (4, top))
    image.save(out)
    return Path(out)
