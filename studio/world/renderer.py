"""Vectorised, seeded Shapes World renderer: signed distance fields in torch, a whole batch at once.

Scenes become padded *primitive* tensors (an emblem is three primitives); each shape's SDF is evaluated once over
all primitives of that shape in the batch, turned into anti-aliased coverage and composited back to front. The
only Python loop is over scenes to draw their few jitter numbers, never over pixels.

Images are float tensors (B, 3, 64, 64) in [0, 1]; `to_model_range` maps them to [-1, 1] for the VAE and base.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from studio.errors import StudioError
from studio.world import sdf
from studio.world.emblems import DOT_SCALE, INNER_SCALE, emblem
from studio.world.grammar import BACKGROUNDS, COLOURS, EMBLEM, IMAGE_SIZE, POSITIONS, SHAPES, Scene
from studio.world.textures import SHADE, TEXTURES, shade_map


if TYPE_CHECKING:
    from PIL import Image


RADIUS = {"small": 6.5, "large": 11.0}  # half-extent in pixels of a plain object
EMBLEM_RADIUS = {"small": 9.0, "large": 13.0}
JITTER_PX, JITTER_SCALE = 1.5, 0.08  # uniform position jitter (pixels) and relative radius jitter
MAX_PRIMITIVES = 9


@dataclass
class Primitives:
    """Padded primitive tensors of a batch (P = MAX_PRIMITIVES); inactive slots have alpha 0."""

    centre: torch.Tensor  # (B, P, 2) pixels, (x, y)
    radius: torch.Tensor  # (B, P) pixels
    shape: torch.Tensor  # (B, P) long, index into SHAPES
    colour: torch.Tensor  # (B, P, 3) in [0, 1]
    texture: torch.Tensor  # (B, P) long, index into TEXTURES
    active: torch.Tensor  # (B, P) bool
    background: torch.Tensor  # (B, 3) in [0, 1]


def object_geometry(scene: Scene, seed: int) -> list[tuple[float, float, float]]:
    """(cx, cy, radius) in pixels of each object of a complete scene, with the seed's jitter."""
    rng = np.random.default_rng([0x5CE, int(seed)])
    out = []
    for obj in scene.objects:
        jx, jy, js = rng.uniform(-1, 1, size=3)
        ax, ay = POSITIONS[obj.position]  # type: ignore[index]
        base = (EMBLEM_RADIUS if obj.shape == EMBLEM else RADIUS)[obj.size]  # type: ignore[index]
        out.append((ax + JITTER_PX * jx, ay + JITTER_PX * jy, base * (1 + JITTER_SCALE * js)))
    return out


def _primitives(scenes: Sequence[Scene], seeds: Sequence[int], device: torch.device) -> Primitives:
    b, p = len(scenes), MAX_PRIMITIVES
    centre = np.zeros((b, p, 2), np.float32)
    radius = np.ones((b, p), np.float32)
    shape = np.zeros((b, p), np.int64)
    colour = np.zeros((b, p, 3), np.float32)
    texture = np.zeros((b, p), np.int64)
    active = np.zeros((b, p), bool)
    background = np.zeros((b, 3), np.float32)
    for i, (scene, seed) in enumerate(zip(scenes, seeds)):
        scene = scene if scene.is_complete() else scene.with_defaults()
        background[i] = np.array(BACKGROUNDS[scene.background], np.float32) / 255  # type: ignore[index]
        k = 0
        for obj, (cx, cy, r) in zip(scene.objects, object_geometry(scene, seed)):
            tex_name = obj.texture or scene.texture or "solid"
            if tex_name not in TEXTURES:
                raise StudioError(f"unknown texture {tex_name!r}; use one of {', '.join(TEXTURES)}")
            if obj.shape == EMBLEM:
                if obj.emblem is None:
                    raise StudioError("an emblem object needs an emblem seed (e.g. --emblem 7)")
                e = emblem(obj.emblem)
                layers = [
                    (e.outer, e.outer_colour, 1.0),
                    (e.inner, e.inner_colour, INNER_SCALE),
                    ("circle", e.dot_colour, DOT_SCALE),
                ]
            else:
                layers = [(obj.shape, obj.colour, 1.0)]
            for shp, col, scale in layers:
                centre[i, k] = (cx, cy)
                radius[i, k] = r * scale
                shape[i, k] = SHAPES.index(shp)
                colour[i, k] = np.array(COLOURS[col], np.float32) / 255
                texture[i, k] = TEXTURES.index(tex_name)
                active[i, k] = True
                k += 1

    def t(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(a).to(device)

    return Primitives(t(centre), t(radius), t(shape), t(colour), t(texture), t(active), t(background))


def render_primitives(prims: Primitives, size: int = IMAGE_SIZE) -> torch.Tensor:
    """Composite primitives back to front: (B, 3, size, size) in [0, 1]."""
    b, p = prims.radius.shape
    dev = prims.radius.device
    coords = torch.arange(size, device=dev, dtype=torch.float32) + 0.5
    gy, gx = torch.meshgrid(coords, coords, indexing="ij")  # (H, W)
    ux = gx - prims.centre[..., 0, None, None]  # (B, P, H, W)
    uy = gy - prims.centre[..., 1, None, None]
    r = prims.radius[..., None, None]  # (B, P, 1, 1)
    dist = torch.full((b, p, size, size), 1e3, device=dev)
    for s, fn in enumerate(sdf.SDF):
        sel = (prims.shape == s) & prims.active  # (B, P)
        if bool(sel.any()):
            pts = torch.stack([ux[sel], uy[sel]], dim=-1) / r[sel][..., None]  # (N, H, W, 2) object units
            dist[sel] = fn(pts) * r[sel]  # back to pixels
    alpha = (0.5 - dist).clamp(0, 1) * prims.active[..., None, None]  # (B, P, H, W)
    shade = shade_map(ux, uy, r, prims.texture[..., None, None])  # (B, P, H, W)
    col = prims.colour[..., None, None] * (1 - (1 - SHADE) * shade[:, :, None])  # (B, P, 3, H, W)
    img = prims.background[:, :, None, None].expand(b, 3, size, size).clone()
    for k in range(p):
        a = alpha[:, k, None]  # (B, 1, H, W)
        img = img * (1 - a) + col[:, k] * a
    return img


def render(
    scenes: Scene | Sequence[Scene], seed: int | Sequence[int] = 0, device: str | torch.device = "cpu"
) -> torch.Tensor:
    """Render one scene (3, 64, 64) or a batch (B, 3, 64, 64), float in [0, 1].

    `seed` sets the jitter; with a batch and an int seed, scene i uses `seed + i`, so a batch equals its
    scenes rendered one by one. Scenes with unspecified attributes are completed by `Scene.with_defaults`.
    """
    single = isinstance(scenes, Scene)
    batch = [scenes] if single else list(scenes)
    if not batch:
        raise StudioError("nothing to render: pass at least one scene")
    if isinstance(seed, int | np.integer):
        seeds = [int(seed) + i for i in range(len(batch))]
    else:
        seeds = [int(s) for s in seed]
        if len(seeds) != len(batch):
            raise StudioError(f"got {len(seeds)} seeds for {len(batch)} scenes; pass one seed per scene")
    img = render_primitives(_primitives(batch, seeds, torch.device(device)))
    return img[0] if single else img


def to_model_range(images: torch.Tensor) -> torch.Tensor:
    """[0, 1] -> [-1, 1] (the VAE's and the base's pixel range)."""
    return images * 2 - 1


def to_pil(image: torch.Tensor) -> Image.Image:
    """A (3, H, W) float image in [0, 1] as a PIL RGB image."""
    from PIL import Image

    arr = (image.detach().clamp(0, 1) * 255 + 0.5).to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(arr, "RGB")


def from_pil(image: Image.Image) -> torch.Tensor:
    """A PIL image as a (3, H, W) float tensor in [0, 1]."""
    arr = np.asarray(image.convert("RGB"), dtype=np.float32) / 255
    return torch.from_numpy(arr.copy()).permute(2, 0, 1)
