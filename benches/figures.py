"""Figures the benches share: a grid of generated images, one row per bench row."""

from __future__ import annotations

from pathlib import Path

import torch


def save_grid(path: Path, rows: list[list[torch.Tensor]]) -> None:
    """Write `rows` (each a list of (3, H, W) images in [0, 1]) as one PNG, every row cut to the shortest one."""
    from torchvision.transforms.functional import to_pil_image
    from torchvision.utils import make_grid

    from studio.atomic import atomic_write

    rows = [r for r in rows if r]
    if not rows:
        return
    n = min(len(r) for r in rows)
    tiles = torch.stack([img.float().cpu() for r in rows for img in r[:n]])  # (rows * n, 3, H, W)
    image = make_grid(tiles, nrow=n, padding=2, pad_value=1.0)
    atomic_write(Path(path), lambda tmp: to_pil_image(image).save(tmp, format="png"))
