"""Small plots drawn with PIL (no plotting library is a dependency): training loss curves and the like."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

from PIL import Image, ImageDraw

from studio.atomic import atomic_write


def moving_average(values: Sequence[float], window: int) -> list[float]:
    """Trailing mean over `window` values (shorter at the start)."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def line_plot(
    values: Sequence[float],
    path: str | Path,
    title: str = "",
    smooth: int = 1,
    size: tuple[int, int] = (640, 360),
    log_y: bool = True,
) -> Path:
    """Draw `values` against their index (raw in light grey, a `smooth`-step moving average in blue) as a PNG."""
    w, h = size
    left, right, top, bottom = 64, 16, 28, 36
    img = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(img)
    draw.text((left, 8), title, fill="black")
    finite = [v for v in values if math.isfinite(v) and (v > 0 or not log_y)]
    if len(finite) >= 2:
        f = math.log10 if log_y else (lambda v: v)
        lo, hi = f(min(finite)), f(max(finite))
        hi = hi if hi > lo else lo + 1e-6

        def xy(i: int, v: float) -> tuple[float, float]:
            x = left + (w - left - right) * i / max(len(values) - 1, 1)
            y = top + (h - top - bottom) * (1 - (f(v) - lo) / (hi - lo))
            return x, y

        for series, colour in ((values, (200, 200, 200)), (moving_average(values, smooth), (31, 119, 180))):
            points = [xy(i, v) for i, v in enumerate(series) if math.isfinite(v) and (v > 0 or not log_y)]
            if len(points) >= 2:
                draw.line(points, fill=colour, width=2 if colour[0] < 100 else 1)
        for frac in (0.0, 0.5, 1.0):
            v = lo + (hi - lo) * (1 - frac)
            y = top + (h - top - bottom) * frac
            draw.text((4, y - 6), f"{10**v if log_y else v:.3g}", fill="black")
            draw.line([(left - 4, y), (left, y)], fill="black")
    draw.rectangle([left, top, w - right, h - bottom], outline="black")
    draw.text((left, h - bottom + 8), "step 0", fill="black")
    draw.text((w - right - 90, h - bottom + 8), f"step {len(values)}", fill="black")
    return atomic_write(path, lambda tmp: img.save(tmp, format="png"))
