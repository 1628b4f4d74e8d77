"""Region masks against hand-computed masks; attention capture shapes, sums, levels and exact removal."""

from __future__ import annotations

import pytest
import torch
from tiny_models import BUILDERS

from composers import (
    attention_levels,
    box_mask,
    box_masks,
    capture_attention,
    install_processors,
    level_size,
    mass_inside,
    token_indices,
    word_maps,
)


def _unet(kind: str) -> torch.nn.Module:
    if kind == "embedded":  # the shipped studio-tiny's architecture (what `studio world train-base` builds)
        from diffusers import UNet2DConditionModel

        from studio.world.base import BASE_DIR

        torch.manual_seed(0)
        return UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(BASE_DIR / "unet"))
    return BUILDERS[kind]().unet


def _hand_mask(size: int, rows: range, cols: range) -> torch.Tensor:
    m = torch.zeros(size, size)
    for i in rows:
        for j in cols:
            m[i, j] = 1.0
    return m


# Box A = (0.25, 0, 0.75, 0.5): cell centres (j + 0.5) / s inside [0.25, 0.75) x [0, 0.5).
# Box B = (0.3, 0.6, 0.45, 1.0): at 16 columns 5, 6 (0.344, 0.406) and rows 10-15; at 8 columns 2, 3 (0.3125,
# 0.4375) and rows 5-7; at 4 column 1 (0.375) and rows 2-3.
HAND = {
    16: (_hand_mask(16, range(0, 8), range(4, 12)), _hand_mask(16, range(10, 16), range(5, 7))),
    8: (_hand_mask(8, range(0, 4), range(2, 6)), _hand_mask(8, range(5, 8), range(2, 4))),
    4: (
        torch.tensor([[0, 1, 1, 0], [0, 1, 1, 0], [0, 0, 0, 0], [0, 0, 0, 0]], dtype=torch.float32),
        torch.tensor([[0, 0, 0, 0], [0, 0, 0, 0], [0, 1, 0, 0], [0, 1, 0, 0]], dtype=torch.float32),
    ),
}
BOXES = [(0.25, 0.0, 0.75, 0.5), (0.3, 0.6, 0.45, 1.0)]


@pytest.mark.parametrize(
    "kind, levels",
    [
        ("sd1", {0: 16, 1: 8, 2: 4}),
        ("sdxl", {1: 8, 2: 4}),
        ("embedded", {0: 16, 1: 8, 2: 4}),
    ],
)
def test_box_masks_equal_hand_computed_masks_at_every_attention_resolution(kind: str, levels: dict) -> None:
    unet = _unet(kind)
    masks = box_masks(BOXES, unet, (16, 16))
    assert {lv: m.shape[-1] for lv, m in masks.items()} == levels  # every attention level of this UNet, no other
    for level, side in levels.items():
        assert masks[level].shape == (2, side, side)
        assert torch.equal(masks[level][0], HAND[side][0]), (kind, level)
        assert torch.equal(masks[level][1], HAND[side][1]), (kind, level)


def test_box_smaller_than_a_cell_keeps_its_centre_cell_and_bad_boxes_are_refused() -> None:
    assert box_mask((0.5, 0.5, 0.52, 0.52), (4, 4)).nonzero().tolist() == [[2, 2]]
    assert level_size((10, 6), 2) == (3, 2)  # rounding up, as stride-2 convolutions with padding 1 do
    with pytest.raises(ValueError, match="x0 < x1"):
        box_mask((0.5, 0.0, 0.4, 1.0), (4, 4))


@pytest.mark.parametrize("kind", ["sd1", "sdxl", "embedded"])
def test_attention_capture_shapes_sums_and_exact_removal(kind: str) -> None:
    unet = _unet(kind)
    g = torch.Generator().manual_seed(0)
    latent_hw = (10, 6)  # odd sizes: the levels round up (10x6 -> 5x3 -> 3x2)
    sample = torch.randn(2, 4, *latent_hw, generator=g)  # (2B: uncond, cond)
    ctx = torch.randn(2, 77, unet.config.cross_attention_dim, generator=g)
    kwargs = {}
    if kind == "sdxl":
        kwargs["added_cond_kwargs"] = {"text_embeds": torch.randn(2, 32, generator=g), "time_ids": torch.zeros(2, 6)}
    originals = dict(unet.attn_processors)
    with torch.no_grad():
        before = unet(sample, 500, ctx, **kwargs).sample
        with capture_attention(unet) as handle:
            captured = unet(sample, 500, ctx, **kwargs).sample
        after = unet(sample, 500, ctx, **kwargs).sample
    store = handle.state
    levels = attention_levels(unet)
    cross = [n for n in levels if ".attn2." in n]
    assert set(store.maps) == set(cross) and all(len(v) == 1 for v in store.maps.values())
    assert store.captured_levels() == set(levels.values())
    for level in store.captured_levels():
        h, w = level_size(latent_hw, level)
        maps = store.average(level)
        assert maps.shape == (2, h, w, 77)
        torch.testing.assert_close(maps.sum(-1), torch.ones(2, h, w), atol=1e-5, rtol=0)
        assert maps.std() > 0
    torch.testing.assert_close(captured, before, atol=1e-5, rtol=1e-5)  # explicit softmax == SDPA
    assert torch.equal(after, before)  # removal is exact
    assert all(unet.attn_processors[n] is p for n, p in originals.items())


def test_attention_capture_at_chosen_levels_only_and_word_maps() -> None:
    pipe = BUILDERS["sd1"]()
    ids = pipe.tokenizer("a red star and a blue moon").input_ids
    assert token_indices(pipe.tokenizer, "a red star and a blue moon", "blue moon") == [6, 7]
    assert token_indices(pipe.tokenizer, "a red star and a blue moon", "star") == [3]
    with pytest.raises(ValueError, match="not a word"):
        token_indices(pipe.tokenizer, "a red star", "moon")
    ctx = pipe.text_encoder(torch.tensor([ids + [49407] * (77 - len(ids))]))[0]  # (1, 77, 32)
    with torch.no_grad(), capture_attention(pipe.unet, levels=[1]) as handle:
        pipe.unet(torch.randn(1, 4, 16, 16), 10, ctx)
    assert handle.state.captured_levels() == {1}
    maps = handle.state.average(1)  # (1, 8, 8, 77)
    star = word_maps(maps, [3])
    assert star.shape == (1, 8, 8) and torch.equal(star, maps[..., 3])
    left = box_mask((0.0, 0.0, 0.5, 1.0), (8, 8))
    share = mass_inside(star, left)
    torch.testing.assert_close(share, star[..., :4].sum((-2, -1)) / star.sum((-2, -1)))
    torch.testing.assert_close(share + mass_inside(star, 1 - left), torch.ones(1))
    assert handle.removed


def test_install_processors_swaps_only_named_entries() -> None:
    unet = BUILDERS["sd1"]().unet
    originals = dict(unet.attn_processors)
    name = next(n for n in originals if ".attn1." in n)
    marker = type(originals[name])()
    handle = install_processors(unet, {name: marker})
    assert unet.attn_processors[name] is marker
    assert all(unet.attn_processors[n] is p for n, p in originals.items() if n != name)
    handle.remove()
    assert all(unet.attn_processors[n] is p for n, p in originals.items())
    with pytest.raises(KeyError, match="no attention processor"):
        install_processors(unet, {"nope.processor": marker})
