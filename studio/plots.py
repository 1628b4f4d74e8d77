"""Training-loss curves: one series computation for the page's chart and the `loss.png` a run and its library entry
keep (drawn with PIL; no plotting library is a dependency).

`loss_series(losses)` gives the steps, the raw losses, a moving average over them and the step of the last
checkpoint; the web UI plots exactly these numbers (`studio.ui.train_view.loss_frame`) and `draw_loss` draws them
as a PNG with numeric axes (linear or log), raw points in grey, the smoothed line in blue and the checkpoint in red.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

from studio.atomic import atomic_write


RAW, SMOOTHED, CHECKPOINT = (170, 170, 170), (31, 119, 180), (214, 39, 40)  # colours shared with the page's chart


def moving_average(values: Sequence[float], window: int) -> list[float]:
    """Trailing mean over `window` values (shorter at the start)."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def smoothing_window(n: int) -> int:
    """The moving-average window for `n` points: about a twentieth of the run, at least 2 (1 for a single point)."""
    return 1 if n < 2 else max(2, n // 20)


@dataclass
class LossSeries:
    steps: list[int]  # the optimizer step of each loss (1-based)
    raw: list[float]
    smoothed: list[float]  # trailing mean over `window` losses
    window: int
    checkpoint: int | None = None  # step of the last checkpoint, marked on the chart

    def finite(self, log_y: bool = False) -> list[float]:
        """The plottable values of both lines (positive ones only on a log axis)."""
        return [v for v in (*self.raw, *self.smoothed) if math.isfinite(v) and (v > 0 or not log_y)]


def loss_series(
    losses: Sequence[float], first_step: int = 1, checkpoint: int | None = None, window: int | None = None
) -> LossSeries:
    """Loss i (0-based) is step `first_step + i`; `window` defaults to `smoothing_window(len(losses))`."""
    raw = [float(v) for v in losses]
    window = window or smoothing_window(len(raw))
    steps = list(range(first_step, first_step + len(raw)))
    return LossSeries(steps, raw, moving_average(raw, window), window, checkpoint)


def nice_ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    """Round tick values (1, 2 or 5 times a power of ten apart) covering [lo, hi]."""
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return []
    if hi <= lo:
        return [lo]
    raw = (hi - lo) / max(count - 1, 1)
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw)
    first = math.ceil(lo / step - 1e-9)
    return [round(k * step, 12) for k in range(first, math.floor(hi / step + 1e-9) + 1)]


def log_ticks(lo: float, hi: float) -> list[float]:
    """Ticks for a log axis over [lo, hi] (lo > 0): 1-2-5 per decade across decades, round values within one."""
    if hi / lo < 10:
        return [t for t in nice_ticks(lo, hi) if t > 0]
    ticks = []
    for exponent in range(math.floor(math.log10(lo)), math.ceil(math.log10(hi)) + 1):
        ticks += [m * 10.0**exponent for m in (1, 2, 5) if lo <= m * 10.0**exponent <= hi]
    return ticks


def _label(value: float) -> str:
    return f"{value:.4g}"


def draw_loss(
    series: LossSeries,
    path: str | Path,
    *,
    title: str = "training loss",
    log_y: bool = False,
    size: tuple[int, int] = (640, 360),
) -> Path:
    """`series` as a PNG: numeric step and loss axes with ticks, raw losses (grey dots and line), the moving average
    (blue), the last checkpoint (red vertical line) and a legend."""
    w, h = size
    left, right, top, bottom = 64, 16, 40, 40
    img = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(img)
    draw.text((8, 8), title + (" (log scale)" if log_y else ""), fill="black")
    legend = [(RAW, "raw"), (SMOOTHED, f"mean of {series.window} steps" if series.window > 1 else "smoothed")]
    if series.checkpoint is not None:
        legend.append((CHECKPOINT, f"checkpoint (step {series.checkpoint})"))
    x0 = w - right - 8 - sum(30 + 7 * len(text) for _, text in legend)
    for colour, text in legend:
        draw.line([(x0, 14), (x0 + 18, 14)], fill=colour, width=3)
        draw.text((x0 + 22, 8), text, fill="black")
        x0 += 30 + 7 * len(text)
    plot = (left, top, w - right, h - bottom)
    draw.rectangle(plot, outline="black")
    values = series.finite(log_y)
    if values and series.steps:
        f = math.log10 if log_y else float
        lo, hi = min(values), max(values)
        pad = (f(hi) - f(lo)) * 0.05 or 0.05 * (abs(f(hi)) or 1.0)
        y_lo, y_hi = f(lo) - pad, f(hi) + pad
        s_lo, s_hi = series.steps[0], series.steps[-1]
        if series.checkpoint is not None:
            s_lo, s_hi = min(s_lo, series.checkpoint), max(s_hi, series.checkpoint)
        margin = max((s_hi - s_lo) * 0.02, 0.5 if s_hi == s_lo else 0.0)  # keep end points off the frame
        s_lo, s_hi = s_lo - margin, s_hi + margin

        def x_of(step: float) -> float:
            return plot[0] + (plot[2] - plot[0]) * (step - s_lo) / (s_hi - s_lo)

        def y_of(value: float) -> float:
            return plot[3] - (plot[3] - plot[1]) * (f(value) - y_lo) / (y_hi - y_lo)

        ticks = log_ticks(10**y_lo, 10**y_hi) if log_y else nice_ticks(y_lo, y_hi)
        for tick in ticks:
            y = y_of(tick)
            draw.line([(plot[0] + 1, y), (plot[2] - 1, y)], fill=(235, 235, 235))
            draw.line([(plot[0] - 4, y), (plot[0], y)], fill="black")
            draw.text((4, y - 6), _label(tick), fill="black")
        for tick in nice_ticks(max(s_lo, 0), s_hi, count=6):
            if tick == int(tick) and tick >= series.steps[0] - margin:
                x = x_of(tick)
                draw.line([(x, plot[3]), (x, plot[3] + 4)], fill="black")
                draw.text((x - 3 * len(str(int(tick))), plot[3] + 6), str(int(tick)), fill="black")
        draw.text((plot[2] - 28, h - 14), "step", fill="black")
        if series.checkpoint is not None:
            x = x_of(series.checkpoint)
            for y in range(plot[1] + 1, plot[3], 8):  # dashed
                draw.line([(x, y), (x, min(y + 4, plot[3] - 1))], fill=CHECKPOINT, width=2)
        for line, colour, width in ((series.raw, RAW, 1), (series.smoothed, SMOOTHED, 2)):
            shown = [(s, v) for s, v in zip(series.steps, line) if math.isfinite(v) and (v > 0 or not log_y)]
            points = [(x_of(s), y_of(v)) for s, v in shown]
            if len(points) >= 2:
                draw.line(points, fill=colour, width=width)
            if colour == RAW:
                for x, y in points:
                    draw.ellipse([x - 2, y - 2, x + 2, y + 2], fill=colour)
    return atomic_write(path, lambda tmp: img.save(tmp, format="png"))
