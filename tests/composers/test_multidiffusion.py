"""MultiDiffusion with one adapter per box on the tiny pipelines with random (non-identity) adapters: per-row adapter
deltas, the fused prediction against each path computed on its own, exact removal, and the CLI."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from composer_helpers import add_random_adapter
from tiny_models import BUILDERS

import composers
from composers import AdapterSet, MultiDiffusionConfig
from composers.activation import activate
from composers.multidiffusion import path_masks
from composers.region_lora import install_sample_deltas, set_scales
from studio.cli import main
from studio.errors import StudioError
from studio.generate import GenerateConfig, generate
from studio.library import load_adapters, unload_adapters
from studio.prompts import encode_prompt


PROMPT = "a large qa emblem on the left and a large qb emblem on the right on a white background"
BOXES = {"qa": (0.0, 0.0, 0.5, 1.0), "qb": (0.5, 0.0, 1.0, 1.0)}


def _pipe():
    # Moderate random adapters: at larger scales the random tiny UNet amplifies float rounding between batch layouts
    # (PEFT's own output for one row differs between batch 1 and batch 3 by 1e-2 at scale 0.5).
    pipe = BUILDERS["sd1"]()
    add_random_adapter(pipe, "qa", 1, kind="subject", scale=0.2)
    add_random_adapter(pipe, "qb", 2, kind="subject", scale=0.2)
    return pipe


def _unet_inputs(pipe, batch: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    z = torch.randn(batch, pipe.unet.config.in_channels, 8, 8, generator=g)  # (B, C, 8, 8)
    return z, torch.tensor(500)


def test_sample_deltas_give_each_row_its_own_adapter() -> None:
    pipe = _pipe()
    load_adapters(pipe, ["qa", "qb"], [1.0, 0.7])
    z, t = _unet_inputs(pipe, 1)
    ctx = torch.randn(1, 77, pipe.text_encoder.config.hidden_size)
    expected = []
    with torch.no_grad():
        for on in ({}, {"qa": 1.0}, {"qb": 0.7}):
            activate(pipe.unet, on)
            expected.append(pipe.unet(z, t, encoder_hidden_states=ctx).sample)
        activate(pipe.unet, {})
        set_scales(pipe.unet, {"qa": 1.0, "qb": 0.7})
        rows = {"qa": slice(1, 2), "qb": slice(2, 3)}
        with install_sample_deltas(pipe.unet, ["qa", "qb"], rows):
            got = pipe.unet(z.repeat(3, 1, 1, 1), t, encoder_hidden_states=ctx.repeat(3, 1, 1)).sample  # (3, C, H, W)
        base_again = pipe.unet(z, t, encoder_hidden_states=ctx).sample
    assert (expected[1] - expected[0]).abs().max() > 1e-3 and (expected[2] - expected[1]).abs().max() > 1e-3
    for row, want in enumerate(expected):
        torch.testing.assert_close(got[row:row + 1], want, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(base_again, expected[0])  # the hooks are gone


@pytest.mark.parametrize("batched", [True, False])
def test_each_box_holds_its_own_path_and_the_rest_the_global_prompt(batched: bool) -> None:
    pipe = _pipe()
    adapters = AdapterSet.parse("qa,qb").resolve()
    config = MultiDiffusionConfig(boxes=dict(BOXES), batched=batched).for_prompt(PROMPT)
    assert config.region_prompts["qb"].startswith("a large qb emblem on the right")
    z, t = _unet_inputs(pipe)
    glob = encode_prompt(pipe, PROMPT, None, guidance=False).prompt_embeds.expand(2, -1, -1)  # (2, 77, D)
    with torch.no_grad(), composers.apply(pipe, adapters, "multidiffusion", config):
        fused = pipe.unet(z, t, encoder_hidden_states=glob).sample  # no CFG outside a pipeline call
    load_adapters(pipe, ["qa", "qb"], [1.0, 1.0])
    paths = []
    with torch.no_grad():
        activate(pipe.text_encoder, {})
        activate(pipe.unet, {})
        paths.append(pipe.unet(z, t, encoder_hidden_states=glob).sample)
        for name in ("qa", "qb"):
            activate(pipe.text_encoder, {name: 1.0})
            activate(pipe.unet, {name: 1.0})
            ctx = encode_prompt(pipe, config.region_prompts[name], None, guidance=False).prompt_embeds
            paths.append(pipe.unet(z, t, encoder_hidden_states=ctx.expand(2, -1, -1)).sample)
    unload_adapters(pipe)
    masks = path_masks([BOXES["qa"], BOXES["qb"]], (8, 8))  # (3, 1, 1, 8, 8)
    assert masks[0].sum() == 0 and masks[1][..., :, :4].min() == 1 and masks[1][..., :, 4:].max() == 0
    torch.testing.assert_close(fused[..., :4], paths[1][..., :4], atol=1e-5, rtol=1e-4)  # left box: qa's path
    torch.testing.assert_close(fused[..., 4:], paths[2][..., 4:], atol=1e-5, rtol=1e-4)  # right box: qb's path
    assert (paths[1] - paths[0]).abs().max() > 1e-3


def test_one_adapter_holding_two_concepts_gets_a_region_per_placed_clause() -> None:
    pipe = BUILDERS["sd1"]()
    add_random_adapter(pipe, "qs", 3, kind="subject", scale=0.2, triggers=["qa", "qb"])  # as a merged orthogonal sum
    adapters = AdapterSet.parse("qs").resolve()
    config = MultiDiffusionConfig().with_layout(PROMPT, adapters)
    left, right = (f"a large {q} emblem on the {p} on a white background"
                   for q, p in (("qa", "left"), ("qb", "right")))
    assert config.boxes == {} and config.regions == {left: (0.0, 0.25, 0.5, 0.75), right: (0.5, 0.25, 1.0, 0.75)}
    z, t = _unet_inputs(pipe)
    glob = encode_prompt(pipe, PROMPT, None, guidance=False).prompt_embeds.expand(2, -1, -1)  # (2, 77, D)
    with torch.no_grad(), composers.apply(pipe, adapters, "multidiffusion", config):
        fused = pipe.unet(z, t, encoder_hidden_states=glob).sample
    load_adapters(pipe, ["qs"], [1.0])
    with torch.no_grad():  # every path with the adapter on, each with its own prompt
        paths = [pipe.unet(z, t, encoder_hidden_states=ctx.expand(2, -1, -1)).sample for ctx in (
            glob[:1], *(encode_prompt(pipe, text, None, guidance=False).prompt_embeds for text in (left, right)))]
    unload_adapters(pipe)
    torch.testing.assert_close(fused[..., 2:6, :4], paths[1][..., 2:6, :4], atol=1e-5, rtol=1e-4)  # qa's clause
    torch.testing.assert_close(fused[..., 2:6, 4:], paths[2][..., 2:6, 4:], atol=1e-5, rtol=1e-4)  # qb's clause
    torch.testing.assert_close(fused[..., :2, :], paths[0][..., :2, :], atol=1e-5, rtol=1e-4)  # outside: the global
    assert (paths[1] - paths[0]).abs().max() > 1e-3 and (paths[2] - paths[1]).abs().max() > 1e-3
    with pytest.raises(StudioError, match="--region 'a qa emblem:0,0,1': write PROMPT:x0,y0,x1,y1"):
        composers.from_options(PROMPT, "qs", "multidiffusion", regions=["a qa emblem:0,0,1"])
    with pytest.raises(StudioError, match="--region 'a qa emblem': box .* must be"):
        composers.from_options(PROMPT, "qs", "multidiffusion", regions=["a qa emblem:0.5,0,0.5,1"])
    _, _, given = composers.from_options(PROMPT, "qs", "multidiffusion", regions=["a qa: emblem:0,0,0.5,1"])
    assert given.regions == {"a qa: emblem": (0.0, 0.0, 0.5, 1.0)}  # split at the last colon; given, not laid out


def test_outside_the_boxes_is_the_global_path_and_overlaps_average() -> None:
    masks = path_masks([(0.0, 0.0, 0.75, 1.0), (0.25, 0.0, 1.0, 0.5)], (4, 4))[:, 0, 0]  # (3, 4, 4)
    torch.testing.assert_close(masks.sum(0), torch.ones(4, 4))
    assert masks[0, 3, 3] == 1 and masks[1, 0, 1] == 0.5 and masks[2, 0, 1] == 0.5 and masks[1, 3, 0] == 1


def test_generation_and_removal_restore_the_pipeline() -> None:
    pipe = _pipe()
    config = GenerateConfig(prompt=PROMPT, steps=3, size="32x32", num_images=2)
    before = generate(config, pipe=pipe, output_type="np").images
    adapters = AdapterSet.parse("qa,qb")
    fused = composers.compose(config, adapters, "multidiffusion", MultiDiffusionConfig(boxes=dict(BOXES)), pipe=pipe,
                              output_type="np")
    merged = composers.compose(config, adapters, "merge", pipe=pipe, output_type="np").images
    assert np.isfinite(fused.images).all() and np.abs(fused.images - merged).max() > 1e-3
    assert fused.params[0]["composer"] == "multidiffusion"
    assert np.array_equal(generate(config, pipe=pipe, output_type="np").images, before)


def test_cli_needs_a_box_or_a_place_in_the_prompt(tiny_dirs, tmp_path, capsys) -> None:
    from studio.models import load_pipeline
    from studio.pnginfo import read_parameters

    model = str(tiny_dirs["sd1"])
    pipe = load_pipeline(model)
    add_random_adapter(pipe, "qa", 1, kind="subject")
    out = tmp_path / "md.png"
    common = ["compose", "--model", model, "--steps", "2", "--size", "32x32", "--prompt", PROMPT, "--adapters", "qa",
              "--composer", "multidiffusion", "--out", str(out)]
    assert main([*common, "--box", "qa:0,0,0.5,1"]) == 0 and out.is_file()
    assert main(common) == 0  # no --box: "on the left" places it
    assert read_parameters(out)["composer_config"]["boxes"] == {"qa": [0, 0.25, 0.5, 0.75]}
    capsys.readouterr()
    assert main([*common, "--prompt", "a large qa emblem on a white background"]) == 2
    assert "needs a box" in capsys.readouterr().err
