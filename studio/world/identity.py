"""Identity scores of held-out concepts (emblems, textures) and the shared mask/template helpers of the evaluator.

Emblem: the candidate emblems are rendered in the component's place (radius fitted to the hole-filled area), passed
through the shipped VAE like a generated image, blurred, and compared by mean absolute colour error over the
emblem's core and rim. Texture: the shade map (pixel = lerp(colour, SHADE * colour, t)) of an object's eroded
interior is correlated with each texture's blurred analytic template over 81 integer shifts (any phase) and with
the object re-rendered in that texture through the VAE. The decisions (thresholds, rank-first) live in
`studio.world.evaluator`.
"""

from __future__ import annotations

import functools
import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from studio.world import sdf
from studio.world.emblems import DOT_SCALE, INNER_SCALE
from studio.world.emblems import emblem as emblem_of
from studio.world.grammar import COLOURS, IMAGE_SIZE, SHAPES
from studio.world.renderer import Primitives, render_primitives
from studio.world.textures import SHADE, TEXTURES, shade_map


if TYPE_CHECKING:
    from diffusers import AutoencoderKL


EMBLEM_MAE_SCALE = 0.25  # mean absolute RGB error that scores 0
EMBLEM_TEMPLATES_THROUGH_VAE = True  # emblem templates pass through the shipped VAE (when it is there)
TEXTURE_OBJECT_TEMPLATES_THROUGH_VAE = True  # the object re-rendered in each texture, through the VAE
TEXTURE_TEMPLATES_THROUGH_VAE = False  # canvas-filling swatches are out of the VAE's range: blurred analytic ones
SOLID_STD = 0.12  # shade-map std at which an object stops looking solid


@functools.lru_cache(maxsize=1)
def shape_stats() -> tuple[torch.Tensor, torch.Tensor]:
    """Unit area (8,) and centroid offset (8, 2) of each shape, measured on a fine grid."""
    n = 400
    c = (torch.arange(n) + 0.5) / n * 2.4 - 1.2
    gy, gx = torch.meshgrid(c, c, indexing="ij")
    p = torch.stack([gx, gy], -1)
    areas, offsets = [], []
    for fn in sdf.SDF:
        m = (fn(p) < 0).float()
        areas.append(m.sum() * (2.4 / n) ** 2)
        offsets.append(torch.stack([(m * gx).sum(), (m * gy).sum()]) / m.sum())
    return torch.stack(areas), torch.stack(offsets)


def fill_holes(mask: torch.Tensor) -> torch.Tensor:
    """The mask with every background region that does not reach the border filled in."""
    outside = torch.zeros_like(mask)
    outside[0], outside[-1], outside[:, 0], outside[:, -1] = ~mask[0], ~mask[-1], ~mask[:, 0], ~mask[:, -1]
    free = ~mask
    for _ in range(mask.numel()):
        new = (F.max_pool2d(outside.float()[None, None], 3, 1, 1)[0, 0] > 0) & free
        if torch.equal(new, outside):
            break
        outside = new
    return ~outside


def erode(mask: torch.Tensor, k: int) -> torch.Tensor:
    out = mask.float()
    for _ in range(k):
        out = -F.max_pool2d(-out[None, None], 3, 1, 1)[0, 0]
    return out > 0.5


def pixel_grid() -> tuple[torch.Tensor, torch.Tensor]:
    c = torch.arange(IMAGE_SIZE, dtype=torch.float32) + 0.5
    gy, gx = torch.meshgrid(c, c, indexing="ij")
    return gx, gy


def blur(x: torch.Tensor) -> torch.Tensor:
    k = torch.tensor([1.0, 4.0, 6.0, 4.0, 1.0]) / 16
    k2 = (k[:, None] * k[None]).expand(3, 1, 5, 5)
    return F.conv2d(F.pad(x, (2, 2, 2, 2), mode="replicate"), k2, groups=3)


@functools.lru_cache(maxsize=1)
def shipped_vae() -> AutoencoderKL | None:
    from studio.world.vae import VAE_DIR, load_vae

    return load_vae(VAE_DIR) if (VAE_DIR / "config.json").is_file() else None


def emblem_scores(
    img: torch.Tensor, mask: torch.Tensor, bg: torch.Tensor, seeds: list[int], textures: int | list[int] = 0
) -> torch.Tensor:
    """Scores (len(seeds),) of each candidate emblem rendered in the component's place: 1 - MAE / scale.

    `textures` (an index into TEXTURES, or one per candidate) fills the candidates as the renderer fills a textured
    emblem's three parts, so a textured emblem is judged like with like. The mean absolute RGB error (both images
    blurred, so VAE softening costs little), taken separately over the emblem's core (inner shape and dot) and its
    rim, the worse of the two, is scaled so that an error of `EMBLEM_MAE_SCALE` scores 0 and a perfect match
    scores 1.
    """
    areas, offsets = shape_stats()
    areas = areas.clone()
    areas[SHAPES.index("ring")] = areas[SHAPES.index("circle")]  # a filled ring is a disc
    mask = fill_holes(mask)  # inner parts in the background colour belong to the emblem
    m = mask.float()
    gx, gy = pixel_grid()
    area = m.sum()
    cx, cy = (m * gx).sum() / area, (m * gy).sum() / area
    n = len(seeds)
    prims = Primitives(
        torch.zeros(n, 3, 2),
        torch.ones(n, 3),
        torch.zeros(n, 3, dtype=torch.long),
        torch.zeros(n, 3, 3),
        torch.tensor([textures] * n if isinstance(textures, int) else textures).view(n, 1).expand(n, 3).clone(),
        torch.ones(n, 3, dtype=torch.bool),
        bg.expand(n, 3).clone(),
    )
    for i, seed in enumerate(seeds):
        e = emblem_of(seed)
        s = SHAPES.index(e.outer)
        r = torch.sqrt(area / areas[s])
        centre = torch.stack([cx - offsets[s, 0] * r, cy - offsets[s, 1] * r])
        for k, (shp, col, scale) in enumerate(
            (
                (e.outer, e.outer_colour, 1.0),
                (e.inner, e.inner_colour, INNER_SCALE),
                ("circle", e.dot_colour, DOT_SCALE),
            )
        ):
            prims.centre[i, k], prims.radius[i, k] = centre, r * scale
            prims.shape[i, k] = SHAPES.index(shp)
            prims.colour[i, k] = torch.tensor(COLOURS[col]) / 255
    templates = render_primitives(prims)  # (n, 3, 64, 64)
    vae = shipped_vae() if EMBLEM_TEMPLATES_THROUGH_VAE else None
    if vae is not None:  # judge like with like: a generated image comes out of this decoder too
        from studio.world.vae import round_trip

        templates = round_trip(templates, vae)
    templates = blur(templates)
    err = (templates - blur(img[None])).abs().mean(dim=1)  # (n, 64, 64): blurred like the templates
    core = mask & ((gx - cx) ** 2 + (gy - cy) ** 2 < (INNER_SCALE * 1.1) ** 2 * area / math.pi)  # inner + dot
    rim = mask & ~core
    mae = torch.maximum(err[:, core].mean(dim=1), err[:, rim].mean(dim=1))  # (n,): the worse of both regions
    return 1 - mae / EMBLEM_MAE_SCALE


def shade(img: torch.Tensor, colour: str) -> torch.Tensor:
    """(H, W) shade amount t of each pixel relative to `colour`: pixel = lerp(colour, SHADE * colour, t)."""
    c = torch.tensor(COLOURS[colour], dtype=torch.float32) / 255
    ratio = torch.einsum("chw,c->hw", img, c) / (c @ c).clamp(min=1e-6)
    return ((1 - ratio) / (1 - SHADE)).clamp(0, 1)


@functools.lru_cache(maxsize=128)
def swatch(k: int, colour: str) -> torch.Tensor:
    """(64, 64) shade map of a canvas-filling swatch of texture k in `colour`, through the shipped VAE if present."""
    prims = Primitives(
        torch.full((1, 1, 2), 32.0),
        torch.full((1, 1), 60.0),
        torch.full((1, 1), SHAPES.index("square")),
        (torch.tensor(COLOURS[colour], dtype=torch.float32) / 255).view(1, 1, 3),
        torch.full((1, 1), k),
        torch.ones(1, 1, dtype=torch.bool),
        torch.ones(1, 3),
    )
    img = render_primitives(prims)  # (1, 3, 64, 64), texture phase relative to the canvas centre
    vae = shipped_vae() if TEXTURE_TEMPLATES_THROUGH_VAE else None
    if vae is not None:
        from studio.world.vae import round_trip

        img = round_trip(img, vae)
    return shade(blur(img)[0] if vae is None else img[0], colour)


def texture_scores(
    img: torch.Tensor,
    mask: torch.Tensor,
    colour: str,
    place: tuple[int, tuple[float, float, float]] | None = None,
    bg: torch.Tensor | None = None,
) -> tuple[torch.Tensor, int]:
    """Scores (len(TEXTURES),) of one object's fill and the pixel count they rest on.

    Each texture scores the best correlation of the observed shade map with its blurred analytic template over 81
    integer shifts (any phase); with `place` (shape index, fitted (x, y, r)) and `bg`, also with the object itself
    rendered in that texture and passed through the shipped VAE (judging like with like).
    """
    core = erode(mask, 2)
    if int(core.sum()) < 40:  # thin shapes (rings, crosses): a 1-px erosion keeps enough pixels
        core = erode(mask, 1)
    n = int(core.sum())
    if n < 12:
        return torch.zeros(len(TEXTURES)), 0
    t_obs = shade(img, colour)[core]  # (N,) observed shade on the core pixels
    m = mask.float()
    gx, gy = pixel_grid()
    area = m.sum()
    cx, cy = (m * gx).sum() / area, (m * gy).sum() / area
    r = torch.sqrt(area / math.pi)
    ys, xs = torch.nonzero(core, as_tuple=True)
    y0, y1 = max(int(ys.min()) - 2, 0), min(int(ys.max()) + 3, IMAGE_SIZE)
    x0, x1 = max(int(xs.min()) - 2, 0), min(int(xs.max()) + 3, IMAGE_SIZE)
    box = core[y0:y1, x0:x1]  # the core's bounding box, 2 px margin for the blur
    d = torch.arange(-4, 5)
    dy, dx = (v.flatten() for v in torch.meshgrid(d, d, indexing="ij"))  # (81,) integer shifts: any phase
    oy, ox = round(32 - cy.item()), round(32 - cx.item())  # object-relative pixel -> swatch pixel
    sy = (ys[None] + oy + dy[:, None]).clamp(0, IMAGE_SIZE - 1)  # (81, N)
    sx = (xs[None] + ox + dx[:, None]).clamp(0, IMAGE_SIZE - 1)
    scores = torch.zeros(len(TEXTURES))
    std = t_obs.std()
    scores[0] = 1 - (std / SOLID_STD).clamp(0, 1)
    a = t_obs - t_obs.mean()
    for k in range(1, len(TEXTURES)):
        if TEXTURES[k] == "gradient":  # depends on the object's radius: an analytic, blurred template
            ux = gx[None, y0:y1, x0:x1] - cx + dx.float()[:, None, None]  # (81, h, w)
            uy = gy[None, y0:y1, x0:x1] - cy + dy.float()[:, None, None]
            t = shade_map(ux, uy, r.view(1, 1, 1), torch.tensor(k).view(1, 1, 1))
            t = blur(t[:, None].expand(-1, 3, -1, -1))[:, 0][:, box]  # (81, N)
        else:
            t = swatch(k, colour)[sy, sx]  # (81, N)
        t = t - t.mean(dim=1, keepdim=True)
        ncc = (t @ a) / (t.norm(dim=1) * a.norm()).clamp(min=1e-6)
        scores[k] = ncc.max() * (std / SOLID_STD).clamp(0, 1)
    vae = shipped_vae() if TEXTURE_OBJECT_TEMPLATES_THROUGH_VAE and place is not None and bg is not None else None
    if vae is not None:
        from studio.world.vae import round_trip

        shape, (px, py, pr) = place
        n_tex = len(TEXTURES) - 1
        prims = Primitives(
            torch.tensor([px, py]).expand(n_tex, 1, 2).clone(),
            torch.full((n_tex, 1), pr),
            torch.full((n_tex, 1), shape),
            (torch.tensor(COLOURS[colour], dtype=torch.float32) / 255).expand(n_tex, 1, 3),
            torch.arange(1, len(TEXTURES)).view(n_tex, 1),
            torch.ones(n_tex, 1, dtype=torch.bool),
            bg.expand(n_tex, 3).clone(),
        )
        wx = min(max(int(round(cx.item() - 16)) // 4 * 4, 0), IMAGE_SIZE - 32)
        wy = min(max(int(round(cy.item() - 16)) // 4 * 4, 0), IMAGE_SIZE - 32)
        full = render_primitives(prims)  # (7, 3, 64, 64)
        full[:, :, wy : wy + 32, wx : wx + 32] = round_trip(full[:, :, wy : wy + 32, wx : wx + 32], vae)
        for k in range(1, len(TEXTURES)):
            t = shade(full[k - 1], colour)[core]  # (N,)
            t = t - t.mean()
            ncc = (t @ a) / (t.norm() * a.norm()).clamp(min=1e-6)
            scores[k] = torch.maximum(scores[k], ncc * (std / SOLID_STD).clamp(0, 1))
    return scores, n
