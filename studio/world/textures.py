"""Textures: fill styles held out of the base, the *style* concepts of Shapes World (DESIGN.md section 3).

A texture is a shade map t(u) in [0, 1] over object-local pixel offsets u = (x - cx, y - cy); the fill is
`lerp(colour, SHADE * colour, t)`. Patterns are anti-aliased (a one-pixel linear ramp at each edge) and have
periods of 6 to 8 pixels so that they survive the x4 VAE. Black objects cannot show a texture (SHADE * black is
black), so texture datasets draw chromatic colours only.
"""

from __future__ import annotations

import math

import torch


TEXTURES = ("solid", "stripes", "dots", "checker", "grid", "gradient", "waves", "concentric")
SHADE = 0.35  # a shaded pixel is this fraction of the object colour


def _band(dist: torch.Tensor, half_width: float) -> torch.Tensor:
    # Anti-aliased inside-band indicator from a distance to the band's centre line, in pixels.
    return (half_width - dist + 0.5).clamp(0, 1)


def _periodic_dist(v: torch.Tensor, period: float) -> torch.Tensor:
    # Distance from v to the nearest multiple of `period`.
    return (v - period * torch.round(v / period)).abs()


def shade_map(ux: torch.Tensor, uy: torch.Tensor, radius: torch.Tensor, texture: torch.Tensor) -> torch.Tensor:
    """Shade amount t for each pixel offset; all inputs broadcast to one shape, `texture` holds TEXTURES indices."""
    out = torch.zeros(
        torch.broadcast_shapes(ux.shape, uy.shape, radius.shape, texture.shape), dtype=ux.dtype, device=ux.device
    )
    patterns = {
        "stripes": lambda: _band(_periodic_dist(ux + uy, 8 * math.sqrt(2.0)) / math.sqrt(2.0), 1.6),
        "dots": lambda: (2.2 - torch.sqrt(_periodic_dist(ux, 7) ** 2 + _periodic_dist(uy, 7) ** 2) + 0.5).clamp(0, 1),
        "checker": lambda: (torch.sin(math.pi * (ux + 0.5) / 5) * torch.sin(math.pi * (uy + 0.5) / 5) * 4 + 0.5).clamp(
            0, 1
        ),
        "grid": lambda: torch.maximum(_band(_periodic_dist(ux, 7), 0.8), _band(_periodic_dist(uy, 7), 0.8)),
        "gradient": lambda: ((uy / radius + 1) / 2).clamp(0, 1) * 0.9,
        "waves": lambda: (
            (torch.sin(2 * math.pi * uy / 8 + 2.5 * torch.sin(2 * math.pi * ux / 16)) - 0.2) * 2 + 0.5
        ).clamp(0, 1),
        "concentric": lambda: _band(_periodic_dist(torch.sqrt(ux**2 + uy**2), 6), 1.3),
    }
    for name, fn in patterns.items():
        sel = texture == TEXTURES.index(name)
        if bool(sel.any()):
            out = torch.where(sel, fn().expand_as(out), out)
    return out
