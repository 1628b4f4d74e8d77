"""Concept isolation in the UNet's GroupNorm statistics: a box's features are normalised by statistics that leave
the other boxes out.

LoRA-Composer (Yang et al., arXiv:2403.11627, §3.4) isolates concepts in self-attention: a query in box k may not
attend to a key in another box. A UNet has a second path between regions that the paper leaves open: every
GroupNorm (Wu and He, ECCV 2018, Eq. 1-2: `y = gamma (x - mu_g) / sigma_g + beta`, mu and sigma over a group's
channels and ALL positions) normalises one concept's features by statistics that include the other concept's. On
the embedded base this path decides the picture: two emblems side by side, each adapter inside its box, and the
left emblem forms by step 8 of 20 and is gone by step 12 (composition success 0 of 4 seeds); with statistics that
leave the other boxes out, 4 of 4 (the compose bench's figures are in composers/lora_composer.py).

Per box k the statistics run over the positions outside every other box (box k and the background), so a
concept sees the scene it would see alone; positions outside every box keep the usual statistics; where boxes
overlap their normalisations are averaged, as LoRA-Composer averages overlapping boxes in cross-attention (Eq. 3).
With one box this is GroupNorm exactly.
"""

from __future__ import annotations

import functools

import torch

from composers.handle import Handle
from composers.region_lora import RegionMasks
from lora_kernels.group_norm import region_group_norm


def box_statistics(inside: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, H, W) 0/1 box masks -> `average` (L, N + 1), each normaliser's average over the positions whose statistics
    it takes (box k: itself and every cell no other box has; the last column: all), and `share` (N + 1, L), each
    normaliser's share of a position (overlapping boxes averaged; the last row: the cells outside every box)."""
    inside = inside.flatten(1).float()  # (N, L)
    cover = inside.sum(0)  # (L,) boxes covering each position
    keep = 1 - ((cover[None] - inside) > 0).float() * (1 - inside)  # (N, L)
    keep = torch.cat([keep, torch.ones_like(keep[:1])])  # (N + 1, L)
    share = torch.cat([inside / cover.clamp_min(1), (cover == 0).float()[None]])  # (N + 1, L)
    return (keep / keep.sum(1, keepdim=True)).T.contiguous(), share


def isolated_group_norm(norm: torch.nn.GroupNorm, x: torch.Tensor, inside: torch.Tensor | None,
                        statistics: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """GroupNorm of (B, C, H, W) `x` with per-box statistics; `inside` (N, H, W) 0/1 box masks (`statistics`: their
    `box_statistics`, when cached; then `inside` may be None). `lora_kernels.group_norm` computes it: one Triton
    launch on a GPU, 16 operator calls of plain torch elsewhere, whatever the number of boxes."""
    average, share = statistics or box_statistics(inside)
    return region_group_norm(x, norm.num_groups, norm.weight, norm.bias, norm.eps, average, share)


def install_isolated_norms(unet: torch.nn.Module, regions: RegionMasks,
                           cache: dict[tuple, tuple[torch.Tensor, torch.Tensor]] | None = None) -> Handle:
    """Every GroupNorm of `unet` normalises each box by statistics without the other boxes (while installed).

    Each norm's `forward` is replaced for the time (not a forward hook, which would compute the plain GroupNorm
    first and throw it away). `cache` holds the boxes' statistics per feature-map size (an installation kept for
    the next call passes its own: a recorded step reads them where they are)."""
    cache = {} if cache is None else cache

    def forward(module: torch.nn.GroupNorm, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or len(regions.boxes) < 2 or regions.latent_hw is None:
            return torch.nn.GroupNorm.forward(module, x)
        size = tuple(x.shape[-2:])
        key = (size, x.dtype, x.device)
        if key not in cache:
            with torch.inference_mode(False):  # reused by the latent guidance's backward
                cache[key] = tuple(t.to(x) for t in box_statistics(regions.at(size) > 0))  # (N, h, w) boxes
        return isolated_group_norm(module, x, None, cache[key])

    handle = Handle("isolated_norms")
    for module in unet.modules():
        if isinstance(module, torch.nn.GroupNorm) and "forward" not in module.__dict__:
            module.forward = functools.partial(forward, module)
            handle.add(lambda module=module: module.__dict__.pop("forward", None))
    return handle
