"""Figures the benches share: a grid of generated images, one row per bench row."""

from __future__ import annotations

from pathlib import Path

import torch


def save_grid(path: Path, rows: list[list[torch.Tensor]], labels: list[str] | None = None) -> None:
    """Write `rows` (each a list of (3, H, W) images in [0, 1]) as one PNG, every row cut to the shortest one;
    `labels` (one per row) are written in a column on the left."""
    from PIL import Image, ImageDraw
    from torchvision.transforms.functional import to_pil_image
    from torchvision.utils import make_grid

    from studio.atomic import atomic_write

    if labels is not None and len(labels) != len(rows):
        raise ValueError(f"save_grid: {len(labels)} labels for {len(rows)} rows; give one label a row")
    kept = [(r, lab) for r, lab in zip(rows, labels or [""] * len(rows)) if len(r)]
    if not kept:
        return
    n = min(len(r) for r, _ in kept)
    tiles = torch.stack([img.float().cpu() for r, _ in kept for img in r[:n]])  # (rows * n, 3, H, W)
    image = to_pil_image(make_grid(tiles, nrow=n, padding=2, pad_value=1.0))
    if labels:
        margin = 8 + 7 * max(len(lab) for _, lab in kept)  # the default bitmap font: about 6 px a character
        framed = Image.new("RGB", (image.width + margin, image.height), "white")
        framed.paste(image, (margin, 0))
        draw, height = ImageDraw.Draw(framed), image.height / len(kept)
        for i, (_, lab) in enumerate(kept):
            draw.text((4, int(i * height + height / 2) - 5), lab, fill="black")
        image = framed
    atomic_write(Path(path), lambda tmp: image.save(tmp, format="png"))
