"""Region masks from boxes at every attention resolution of a UNet (SD1/SD2/SDXL layouts).

A box is `(x0, y0, x1, y1)` in image fractions, origin top-left. A cell (row i, column j) of an h x w map belongs
to the box when its centre `((j + 0.5) / w, (i + 0.5) / h)` lies in `[x0, x1) x [y0, y1)`; a box that covers no
centre at a coarse level gets the one cell holding its own centre, so no region vanishes. Resolutions follow the
UNet: level l is the latent size halved l times, rounding up (stride-2 convolutions with padding 1).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

import torch


Box = tuple[float, float, float, float]
_BLOCK = re.compile(r"^(down_blocks|up_blocks)\.(\d+)\.|^mid_block\.")


def attention_levels(unet: torch.nn.Module) -> dict[str, int]:
    """Attention processor name -> level (0 = latent resolution, each level halves it)."""
    n = len(unet.down_blocks)
    levels = {}
    for name in unet.attn_processors:
        m = _BLOCK.match(name)
        if m is None:
            raise ValueError(f"attention processor {name!r} is outside the down/mid/up blocks of a UNet")
        if m.group(1) == "down_blocks":
            levels[name] = int(m.group(2))
        elif m.group(1) == "up_blocks":
            levels[name] = n - 1 - int(m.group(2))
        else:
            levels[name] = n - 1
    return levels


def level_size(latent_hw: tuple[int, int], level: int) -> tuple[int, int]:
    """(h, w) of the maps at `level` for a latent of `latent_hw`."""
    h, w = latent_hw
    for _ in range(level):
        h, w = math.ceil(h / 2), math.ceil(w / 2)
    return h, w


def box_mask(box: Box, size: tuple[int, int]) -> torch.Tensor:
    """(h, w) float mask of `box`, 1 inside and 0 outside (cell-centre rule of the module docstring)."""
    x0, y0, x1, y1 = box
    if not (0.0 <= x0 < x1 <= 1.0 and 0.0 <= y0 < y1 <= 1.0):
        raise ValueError(f"box {box} must be (x0, y0, x1, y1) with 0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1")
    h, w = size
    ys = (torch.arange(h, dtype=torch.float64) + 0.5) / h  # (h,) cell centres
    xs = (torch.arange(w, dtype=torch.float64) + 0.5) / w  # (w,)
    rows = (ys >= y0) & (ys < y1)
    cols = (xs >= x0) & (xs < x1)
    if not rows.any():
        rows[min(int((y0 + y1) / 2 * h), h - 1)] = True
    if not cols.any():
        cols[min(int((x0 + x1) / 2 * w), w - 1)] = True
    return (rows[:, None] & cols[None, :]).float()  # (h, w)


def box_masks(boxes: Sequence[Box], unet: torch.nn.Module, latent_hw: tuple[int, int]) -> dict[int, torch.Tensor]:
    """Level -> (n_boxes, h, w) masks for every level at which `unet` has attention."""
    out = {}
    for level in sorted(set(attention_levels(unet).values())):
        size = level_size(latent_hw, level)
        out[level] = torch.stack([box_mask(box, size) for box in boxes])  # (n_boxes, h, w)
    return out
