"""The benches' image grid: one row per bench row, cut to the shortest, with the rows' names in a left column."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from benches.figures import save_grid


def test_grid_rows_and_labels(tmp_path: Path) -> None:
    tiles = [[torch.zeros(3, 16, 16)] * 3, [torch.ones(3, 16, 16) * 0.5] * 2, []]  # the empty row is left out
    save_grid(tmp_path / "plain.png", tiles)
    save_grid(tmp_path / "named.png", tiles, labels=["lora_composer", "alone", "none"])
    plain, named = np.asarray(Image.open(tmp_path / "plain.png")), np.asarray(Image.open(tmp_path / "named.png"))
    assert plain.shape[:2] == (2 + 2 * 18, 2 + 2 * 18)  # two rows of two tiles (cut to the shortest), 2 px padding
    margin = named.shape[1] - plain.shape[1]
    assert named.shape[0] == plain.shape[0] and margin > 13 * 6  # room for the longest name
    assert np.array_equal(named[:, margin:], plain)  # the images themselves are untouched
    for row in range(2):  # each row's name is drawn beside it, in black on white
        band = named[row * 18 + 2:(row + 1) * 18 + 2, :margin]
        assert (band < 100).any() and (band == 255).mean() > 0.5
    with pytest.raises(ValueError, match="one label a row"):  # a short list would silently drop rows
        save_grid(tmp_path / "short.png", tiles, labels=["lora_composer"])
