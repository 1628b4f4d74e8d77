"""Loss curves: the series (steps, moving average, checkpoint) and the PNG drawn from it, read back by pixels."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from PIL import Image

from studio.plots import CHECKPOINT, SMOOTHED, draw_loss, log_ticks, loss_series, nice_ticks


def test_the_series_numbers_steps_smooths_and_keeps_the_checkpoint() -> None:
    series = loss_series([4.0, 2.0, 3.0, 1.0], first_step=11, checkpoint=14)
    assert series.steps == [11, 12, 13, 14] and series.raw == [4.0, 2.0, 3.0, 1.0]
    assert series.window == 2 and series.smoothed == [4.0, 3.0, 2.5, 2.0]  # trailing mean of 2
    assert series.checkpoint == 14
    assert loss_series([0.5] * 100).window == 5 and loss_series([0.5]).window == 1
    assert loss_series([]).steps == [] and loss_series([math.nan, 1.0]).finite() == [1.0]


def test_ticks_are_round_numbers_in_value_order() -> None:
    assert nice_ticks(0.6, 1.2) == [0.6, 0.8, 1.0, 1.2]
    assert nice_ticks(0, 1000, count=6) == [0, 200, 400, 600, 800, 1000]
    assert log_ticks(0.001, 0.4) == [0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2]
    assert log_ticks(0.6, 1.2) == [0.6, 0.8, 1.0, 1.2]  # within a decade: round linear values


def _columns_of(image: np.ndarray, colour: tuple[int, int, int]) -> np.ndarray:
    return np.nonzero(np.all(image == colour, axis=-1).any(axis=0))[0]


def _rows_of(image: np.ndarray, colour: tuple[int, int, int], column: int) -> np.ndarray:
    column = int(column)
    return np.nonzero(np.all(image[:, column - 1 : column + 2] == colour, axis=-1).any(axis=1))[0]


def test_the_png_draws_a_falling_loss_falling_and_marks_the_checkpoint(tmp_path: Path) -> None:
    losses = [1.0 - 0.08 * i for i in range(11)]  # steps 1..11, falling
    path = draw_loss(loss_series(losses, checkpoint=6), tmp_path / "loss.png")
    image = np.asarray(Image.open(path).convert("RGB"))
    checkpoint = _columns_of(image[40:-40], CHECKPOINT)  # the dashed red line (below the legend)
    assert len(checkpoint) and checkpoint.max() - checkpoint.min() <= 2
    blue = _columns_of(image[40:-40], SMOOTHED)
    left, right = blue.min(), blue.max()
    assert abs((checkpoint.mean() - left) / (right - left) - 0.5) < 0.03  # step 6 is half way from 1 to 11
    top_left, top_right = _rows_of(image, SMOOTHED, left + 2).mean(), _rows_of(image, SMOOTHED, right - 2).mean()
    assert top_left < top_right  # the line goes down the picture as the loss falls

    log_path = draw_loss(loss_series([10.0**-i for i in range(5)], window=1), tmp_path / "log.png", log_y=True)
    log_image = np.asarray(Image.open(log_path).convert("RGB"))
    columns = _columns_of(log_image[40:-40], SMOOTHED)
    rows = [_rows_of(log_image, SMOOTHED, c).mean() for c in np.linspace(columns.min() + 3, columns.max() - 3, 5)]
    assert np.allclose(np.diff(rows), np.diff(rows)[0], rtol=0.25)  # decades fall evenly on a log axis
