"""Concept isolation in the GroupNorm statistics (composers.region_norm): GroupNorm exactly with one box, a box's
normalised features independent of another box's, statistics from the right positions, and LoRA-Composer's switch."""

from __future__ import annotations

import torch
from composer_helpers import add_random_adapter
from tiny_models import BUILDERS

import composers
from composers import AdapterSet, LoraComposerConfig
from composers.region_lora import RegionMasks
from composers.region_norm import install_isolated_norms, isolated_group_norm


def _norm() -> torch.nn.GroupNorm:
    norm = torch.nn.GroupNorm(4, 16)
    with torch.no_grad():  # non-identity affine parameters
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.uniform_(-0.5, 0.5)
    return norm


def _boxes(h: int = 8, w: int = 8) -> torch.Tensor:
    inside = torch.zeros(2, h, w, dtype=torch.bool)
    inside[0, 1:7, 0:3] = True  # box 0, left
    inside[1, 1:7, 4:8] = True  # box 1, right
    inside[1, 2:4, 2:4] = True  # overlapping box 0 on column 2
    return inside


def test_one_box_is_group_norm() -> None:
    norm, x = _norm(), torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(0)) * 3 + 1
    with torch.no_grad():
        assert torch.allclose(isolated_group_norm(norm, x, _boxes()[:1]), norm(x), atol=1e-5)


def _reference(norm: torch.nn.GroupNorm, x: torch.Tensor, seen: torch.Tensor) -> torch.Tensor:
    """GroupNorm of (1, 16, 8, 8) x with statistics over the positions `seen` (8, 8) only, computed directly."""
    xg = x.reshape(1, 4, 4, 64)[..., seen.flatten()]  # (B, g, C/g, |seen|)
    mean, var = xg.mean((2, 3)), xg.var((2, 3), unbiased=False)  # (B, g)
    y = (x.reshape(1, 4, 4, 8, 8) - mean[..., None, None, None]) / torch.sqrt(var + norm.eps)[..., None, None, None]
    return y.reshape(1, 16, 8, 8) * norm.weight[:, None, None] + norm.bias[:, None, None]


def test_a_box_does_not_see_another_box_and_the_background_sees_all() -> None:
    norm, g = _norm(), torch.Generator().manual_seed(1)
    x = torch.randn(1, 16, 8, 8, generator=g)
    inside = _boxes()
    only = [inside[0] & ~inside[1], inside[1] & ~inside[0]]
    moved = x.clone()
    moved[..., only[1]] += 5 * torch.randn(1, 16, int(only[1].sum()), generator=g)
    with torch.no_grad():
        a, b = isolated_group_norm(norm, x, inside), isolated_group_norm(norm, moved, inside)
        plain = norm(x)
        assert torch.allclose(a[..., only[0]], b[..., only[0]], atol=1e-5)  # box 0 is blind to box 1's features
        assert not torch.allclose(plain[..., only[0]], norm(moved)[..., only[0]], atol=1e-3)  # plain GN is not
        per_box = [_reference(norm, x, ~only[1 - k]) for k in (0, 1)]  # box k: all but the other box's own cells
    for k in (0, 1):
        assert torch.allclose(a[..., only[k]], per_box[k][..., only[k]], atol=1e-4)
    both = inside.all(0)  # an overlap averages the two boxes' normalisations
    assert both.any() and torch.allclose(a[..., both], (per_box[0] + per_box[1])[..., both] / 2, atol=1e-4)
    background = ~inside.any(0)
    assert torch.allclose(a[..., background], plain[..., background], atol=1e-5)


def test_installed_on_every_group_norm_and_removed_exactly() -> None:
    pipe = BUILDERS["sd1"]()
    unet = pipe.unet
    regions = RegionMasks([(0.0, 0.0, 0.5, 1.0), (0.5, 0.0, 1.0, 1.0)])
    x = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(2))
    t, ctx = torch.tensor(500), torch.randn(1, 77, unet.config.cross_attention_dim)
    with torch.no_grad():
        before = unet(x, t, ctx).sample
        untrack = regions.track(unet)
        handle = install_isolated_norms(unet, regions)
        isolated = unet(x, t, ctx).sample
        handle.remove()
        untrack()
        after = unet(x, t, ctx).sample
    assert not torch.allclose(isolated, before, atol=1e-4)
    assert torch.equal(after, before)


def test_lora_composer_isolates_the_norms_by_default() -> None:
    pipe = BUILDERS["sd1"]()
    add_random_adapter(pipe, "qa", 1, kind="subject", scale=0.5)
    add_random_adapter(pipe, "qb", 2, kind="subject", scale=0.5)
    norm = next(m for m in pipe.unet.modules() if isinstance(m, torch.nn.GroupNorm))
    boxes = {"qa": (0.0, 0.0, 0.5, 1.0), "qb": (0.5, 0.0, 1.0, 1.0)}
    for isolate in (True, False):
        config = LoraComposerConfig(boxes=boxes, isolate_norms=isolate)
        with composers.apply(pipe, AdapterSet.parse("qa,qb"), "lora_composer", config):
            assert ("forward" in norm.__dict__) == isolate
        assert "forward" not in norm.__dict__
