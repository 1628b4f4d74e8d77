"""What the Train tab shows of a job: the loss chart's data, labelled previews, the side-by-side after training.

The chart plots `studio.plots.loss_series`, the numbers `loss.png` is drawn from: raw losses, their moving average
and the last checkpoint (a vertical line), on numeric axes. Gradio's chart builds its Vega spec from the first frame
it gets and afterwards only swaps the data, so that first frame must already say everything: numeric `step`/`loss`
columns (an empty untyped frame made them categories, and a loss curve read upside down) and every series name
(the colours are assigned to the names present then; a series that appears later is drawn in no colour). Every
frame therefore starts with one empty (NaN, not drawn) row per series.
"""

from __future__ import annotations

import math
from typing import Any

import pandas as pd

from studio.plots import CHECKPOINT, RAW, SMOOTHED, LossSeries, loss_series
from studio.ui.display import display_item
from studio.ui.jobs import Job


LOSS, LOG_LOSS = "loss", "log10 loss"
SERIES = {"raw": RAW, "smoothed": SMOOTHED, "last checkpoint": CHECKPOINT}
COLOURS = {name: "#{:02x}{:02x}{:02x}".format(*rgb) for name, rgb in SERIES.items()}


def _log10(value: float) -> float:
    return math.log10(value) if value > 0 else math.nan


def loss_frame(series: LossSeries) -> pd.DataFrame:
    """Long-format rows (step, loss, log10 loss, series) of the raw and smoothed losses and the checkpoint line,
    after one NaN row per series."""
    rows: list[tuple[int, float, str]] = [(s, v, "raw") for s, v in zip(series.steps, series.raw)]
    rows += [(s, v, "smoothed") for s, v in zip(series.steps, series.smoothed)]
    values = series.finite()
    if series.checkpoint is not None and values:
        rows += [(series.checkpoint, bound(values), "last checkpoint") for bound in (min, max)]  # a vertical line
    first = series.steps[0] if series.steps else 1
    anchors = [(first, math.nan, name) for name in SERIES]  # every series named from the first frame on
    rows = anchors + [r for r in rows if math.isfinite(r[1])]
    return pd.DataFrame(
        {
            "step": pd.Series([r[0] for r in rows], dtype="int64"),
            LOSS: pd.Series([r[1] for r in rows], dtype="float64"),
            LOG_LOSS: pd.Series([_log10(r[1]) for r in rows], dtype="float64"),
            "series": pd.Series([r[2] for r in rows], dtype="string"),
        }
    )


def job_series(job: Job) -> LossSeries:
    steps = [s for s, _ in job.losses]
    first = steps[0] if steps else 1
    return loss_series([v for _, v in job.losses], first_step=first, checkpoint=job.checkpoint_step)


def preview_caption(image: Any, step: int) -> str:
    """`step 4 · a large sks emblem ...` (the loop tags each preview with its prompt)."""
    prompt = getattr(image, "info", {}).get("prompt")
    return f"step {step} · {prompt}" if prompt else f"step {step}"


def preview_items(job: Job) -> list[tuple[Any, str]]:
    return [display_item(image, preview_caption(image, job.preview_step)) for image in job.previews]


def comparison_items(job: Job) -> list[tuple[Any, str]]:
    return [display_item(image, text) for image, text in job.comparison]
