"""The benchmark report's figures, drawn with PIL (no plotting library is a dependency): a scatter plot with a marker
per series and a grouped bar chart, both on numeric axes (`studio.plots.nice_ticks`), with a legend and a caption
that states the machine, threads, steps and seeds the figures were measured with.
"""

from __future__ import annotations

import math
import textwrap
from collections.abc import Sequence
from pathlib import Path

from PIL import Image, ImageDraw

from studio.atomic import atomic_write
from studio.plots import log_ticks, nice_ticks


COLOURS = ((31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
           (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207))
MARKERS = ("circle", "square", "triangle", "diamond", "cross", "down", "plus", "star")
SIZE = (760, 470)
LEFT, RIGHT, TOP = 70, 190, 36  # the legend sits in the right margin
CAPTION_CHARS = 118  # characters per caption line


def marker(draw: ImageDraw.ImageDraw, x: float, y: float, kind: str, colour: tuple[int, int, int], r: int = 5) -> None:
    """One marker of `kind` (see MARKERS) centred on (x, y)."""
    if kind == "circle":
        draw.ellipse([x - r, y - r, x + r, y + r], fill=colour, outline="black")
    elif kind == "square":
        draw.rectangle([x - r, y - r, x + r, y + r], fill=colour, outline="black")
    elif kind in ("triangle", "down"):
        s = -1 if kind == "triangle" else 1
        draw.polygon([(x, y + s * r), (x - r, y - s * r), (x + r, y - s * r)], fill=colour, outline="black")
    elif kind == "diamond":
        draw.polygon([(x, y - r - 1), (x + r + 1, y), (x, y + r + 1), (x - r - 1, y)], fill=colour, outline="black")
    elif kind == "cross":
        draw.line([(x - r, y - r), (x + r, y + r)], fill=colour, width=3)
        draw.line([(x - r, y + r), (x + r, y - r)], fill=colour, width=3)
    elif kind == "plus":
        draw.line([(x - r, y), (x + r, y)], fill=colour, width=3)
        draw.line([(x, y - r), (x, y + r)], fill=colour, width=3)
    else:  # star: a plus and a cross
        marker(draw, x, y, "plus", colour, r)
        marker(draw, x, y, "cross", colour, r - 1)


def style(i: int) -> tuple[str, tuple[int, int, int]]:
    """Series i's marker and colour."""
    return MARKERS[i % len(MARKERS)], COLOURS[i % len(COLOURS)]


class Axes:
    """A plot frame on numeric axes: data -> pixel, ticks and labels, legend and caption."""

    def __init__(self, title: str, caption: str, x_range: tuple[float, float], y_range: tuple[float, float],
                 x_label: str, y_label: str, log_x: bool = False, size: tuple[int, int] = SIZE) -> None:
        self.lines = textwrap.wrap(caption, CAPTION_CHARS)
        w, h = size[0], size[1] + 14 * len(self.lines)
        self.image = Image.new("RGB", (w, h), "white")
        self.draw = ImageDraw.Draw(self.image)
        self.frame = (LEFT, TOP, w - RIGHT, size[1] - 44)
        self.log_x = log_x
        f = math.log10 if log_x else float
        lo, hi = (f(v) for v in x_range)
        pad = (hi - lo) * 0.06 or 0.5
        self.x_lo, self.x_hi = lo - pad, hi + pad
        self.y_lo, self.y_hi = y_range if y_range[1] > y_range[0] else (y_range[0] - 0.5, y_range[0] + 0.5)
        d = self.draw
        d.text((8, 8), title, fill="black")
        d.rectangle(self.frame, outline="black")
        for tick in nice_ticks(self.y_lo, self.y_hi, 6):
            y = self.y(tick)
            d.line([(self.frame[0] + 1, y), (self.frame[2] - 1, y)], fill=(235, 235, 235))
            d.line([(self.frame[0] - 4, y), (self.frame[0], y)], fill="black")
            d.text((6, y - 6), f"{tick:.4g}", fill="black")
        if x_label:
            ticks = log_ticks(10**self.x_lo, 10**self.x_hi) if log_x else nice_ticks(self.x_lo, self.x_hi, 6)
            for tick in ticks:
                x = self.x(tick)
                d.line([(x, self.frame[3]), (x, self.frame[3] + 4)], fill="black")
                text = f"{tick:,.0f}" if abs(tick) >= 1000 else f"{tick:.4g}"
                d.text((x - 3 * len(text), self.frame[3] + 6), text, fill="black")
        d.text((self.frame[0], self.frame[3] + 22), x_label + (" (log scale)" if log_x else ""), fill="black")
        d.text((8, TOP - 16), y_label, fill="black")
        for i, line in enumerate(self.lines):
            d.text((8, size[1] - 6 + 14 * i), line, fill=(60, 60, 60))
        self.legend_y = TOP

    def x(self, value: float) -> float:
        v = math.log10(max(value, 1e-12)) if self.log_x else value
        return self.frame[0] + (self.frame[2] - self.frame[0]) * (v - self.x_lo) / (self.x_hi - self.x_lo)

    def y(self, value: float) -> float:
        return self.frame[3] - (self.frame[3] - self.frame[1]) * (value - self.y_lo) / (self.y_hi - self.y_lo)

    def legend(self, label: str, kind: str, colour: tuple[int, int, int]) -> None:
        x = self.frame[2] + 14
        if kind == "bar":
            self.draw.rectangle([x - 5, self.legend_y - 5, x + 5, self.legend_y + 5], fill=colour, outline="black")
        else:
            marker(self.draw, x, self.legend_y, kind, colour)
        self.draw.text((x + 12, self.legend_y - 6), label[:26], fill="black")
        self.legend_y += 18

    def save(self, path: Path) -> Path:
        return atomic_write(path, lambda tmp: self.image.save(tmp, format="png"))


def _span(values: Sequence[float], floor: float | None = None) -> tuple[float, float]:
    lo, hi = min(values), max(values)
    if floor is not None:
        lo = min(lo, floor)
    ticks = nice_ticks(lo, hi) if hi > lo else [lo]
    step = ticks[1] - ticks[0] if len(ticks) > 1 else (abs(hi) or 1.0) * 0.5
    return (min(ticks[0], lo) if ticks[0] <= lo else ticks[0] - step, hi if ticks[-1] >= hi else ticks[-1] + step)


def scatter(path: Path, series: dict[str, list[tuple[float, float]]], *, title: str, x_label: str, y_label: str,
            caption: str, log_x: bool = False, y_range: tuple[float, float] = (0.0, 1.0)) -> Path:
    """One marker per point, a marker shape and colour per series (legend in the right margin)."""
    points = [p for pts in series.values() for p in pts]
    xs = [x for x, _ in points if not log_x or x > 0] or [1.0]
    x_range = (min(xs), max(xs))
    ys = [y for _, y in points]
    y_range = (min(y_range[0], *ys), max(y_range[1], *ys)) if ys else y_range
    axes = Axes(title, caption, x_range, y_range, x_label, y_label, log_x)
    for i, (label, pts) in enumerate(series.items()):
        kind, colour = style(i)
        axes.legend(label, kind, colour)
        for x, y in pts:
            if not log_x or x > 0:
                marker(axes.draw, axes.x(x), axes.y(y), kind, colour)
    return axes.save(path)


def bars(path: Path, groups: list[str], series: dict[str, list[float | None]], *, title: str, y_label: str,
         caption: str, y_range: tuple[float, float] | None = None) -> Path:
    """Grouped bars: one group per `groups` entry, a bar per series in each (None: no bar), a zero line."""
    values = [v for vs in series.values() for v in vs if v is not None] or [0.0]
    y_range = y_range or _span([*values, 0.0], 0.0)
    axes = Axes(title, caption, (0.0, 1.0), y_range, "", y_label)
    frame, n = axes.frame, max(len(series), 1)
    width = (frame[2] - frame[0]) / max(len(groups), 1)
    zero = axes.y(min(max(0.0, axes.y_lo), axes.y_hi))
    for g, group in enumerate(groups):
        x0 = frame[0] + g * width
        text = group[: int(width / 6.2)]
        axes.draw.text((x0 + width / 2 - 3 * len(text), frame[3] + 6), text, fill="black")
        bar = width * 0.8 / n
        for i, (label, vs) in enumerate(series.items()):
            if g < len(vs) and vs[g] is not None:
                left = x0 + width * 0.1 + i * bar
                top = axes.y(vs[g])
                axes.draw.rectangle([left, min(top, zero), left + bar - 1, max(top, zero)], fill=style(i)[1],
                                    outline="black")
    axes.draw.line([(frame[0], zero), (frame[2], zero)], fill="black")
    for i, label in enumerate(series):
        axes.legend(label, "bar", style(i)[1])
    return axes.save(path)
