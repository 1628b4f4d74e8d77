"""Signed distance functions of the Shapes World shapes, vectorised over any batch shape in torch.

Each function takes points `p` of shape (..., 2) in object units (the shape fits the unit disc, y points down)
and returns the signed distance (...,), negative inside. Formulas follow Inigo Quilez, "2D distance functions"
(iquilezles.org/articles/distfunctions2d): sdBox, sdEquilateralTriangle, sdStar5, sdRhombus, sdCross, sdHeart.
"""

from __future__ import annotations

import math

import torch


def circle(p: torch.Tensor) -> torch.Tensor:
    return p.norm(dim=-1) - 0.95


def _box(p: torch.Tensor, bx: float, by: float) -> torch.Tensor:
    d = p.abs() - p.new_tensor([bx, by])
    return d.clamp(min=0).norm(dim=-1) + d.max(dim=-1).values.clamp(max=0)


def square(p: torch.Tensor) -> torch.Tensor:
    return _box(p, 0.8, 0.8)


def triangle(p: torch.Tensor) -> torch.Tensor:
    # sdEquilateralTriangle, pointing up (y down in images, so flip y), centred on its centroid.
    x, y = p[..., 0].abs(), -p[..., 1] + 0.1
    r = 0.95
    k = math.sqrt(3.0)
    x = x - r
    y = y + r / k
    flip = x + k * y > 0
    x2 = torch.where(flip, (x - k * y) / 2, x)
    y2 = torch.where(flip, (-k * x - y) / 2, y)
    x2 = x2 - x2.clamp(-2 * r, 0)
    return -torch.sqrt(x2 * x2 + y2 * y2) * torch.sign(y2)


def star(p: torch.Tensor) -> torch.Tensor:
    # sdStar5(p, r=1, rf=0.45), one point up (iq works with y up, so flip y).
    r, rf = 1.0, 0.45
    k1x, k1y = 0.809016994375, -0.587785252292
    x, y = p[..., 0].abs(), -p[..., 1] - 0.08
    d = 2 * (k1x * x + k1y * y).clamp(min=0)
    x, y = x - d * k1x, y - d * k1y
    d = 2 * (-k1x * x + k1y * y).clamp(min=0)
    x, y = x + d * k1x, y - d * k1y
    x, y = x.abs(), y - r
    bax, bay = rf * -k1y, rf * k1x - 1.0
    h = ((x * bax + y * bay) / (bax * bax + bay * bay)).clamp(0, r)
    dx, dy = x - bax * h, y - bay * h
    return torch.sqrt(dx * dx + dy * dy) * torch.sign(y * bax - x * bay)


def ring(p: torch.Tensor) -> torch.Tensor:
    return (p.norm(dim=-1) - 0.72).abs() - 0.23


def cross(p: torch.Tensor) -> torch.Tensor:
    return torch.minimum(_box(p, 0.9, 0.3), _box(p, 0.3, 0.9))


def heart(p: torch.Tensor) -> torch.Tensor:
    # sdHeart (iq: y up, tip at the origin, height about 1.1); scaled by s so it fills the unit disc.
    s = 0.64
    x, y = p[..., 0].abs() * s, -p[..., 1] * s + 0.56
    a = torch.sqrt((x - 0.25) ** 2 + (y - 0.75) ** 2) - math.sqrt(2.0) / 4.0
    t = 0.5 * (x + y).clamp(min=0)
    b = torch.sqrt(torch.minimum(x**2 + (y - 1.0) ** 2, (x - t) ** 2 + (y - t) ** 2)) * torch.sign(x - y)
    return torch.where(y + x > 1.0, a, b) / s


def diamond(p: torch.Tensor) -> torch.Tensor:
    return (p.abs().sum(dim=-1) - 1.0) / math.sqrt(2.0)


SDF = (circle, square, triangle, star, ring, cross, heart, diamond)  # index order = grammar.SHAPES
