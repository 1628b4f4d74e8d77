"""The studio's own prompt encoding equals diffusers' `encode_prompt` (transformers 5 broke clip_skip there)."""

from __future__ import annotations

import pytest
import torch
from tiny_models import BUILDERS

from studio.prompts import encode_prompt


@pytest.fixture(scope="module")
def pipes() -> dict:
    return {kind: build() for kind, build in BUILDERS.items()}


@pytest.mark.parametrize("kind", ["sd1", "sd2"])
@pytest.mark.parametrize("negative", [None, "blurry, low quality"])
def test_sd_matches_diffusers(pipes: dict, kind: str, negative: str | None) -> None:
    pipe = pipes[kind]
    ours = encode_prompt(pipe, "a large red star on the left", negative)
    cond, uncond = pipe.encode_prompt("a large red star on the left", "cpu", 1, True, negative)
    assert torch.equal(ours.prompt_embeds, cond)
    assert torch.equal(ours.negative_prompt_embeds, uncond)


@pytest.mark.parametrize("negative", [None, "blurry"])
def test_sdxl_matches_diffusers(pipes: dict, negative: str | None) -> None:
    pipe = pipes["sdxl"]
    ours = encode_prompt(pipe, "a small blue ring", negative)
    cond, uncond, pooled, uncond_pooled = pipe.encode_prompt("a small blue ring", negative_prompt=negative)
    assert ours.prompt_embeds.shape == (1, 77, 64) and ours.pooled_prompt_embeds.shape == (1, 32)
    assert torch.equal(ours.prompt_embeds, cond)
    assert torch.equal(ours.negative_prompt_embeds, uncond)
    assert torch.equal(ours.pooled_prompt_embeds, pooled)
    assert torch.equal(ours.negative_pooled_prompt_embeds, uncond_pooled)
    if negative is None:  # force_zeros_for_empty_prompt
        assert not ours.negative_prompt_embeds.any()


def test_clip_skip_uses_earlier_layer_with_final_norm(pipes: dict) -> None:
    pipe = pipes["sd1"]
    ids = pipe.tokenizer("a green heart", padding="max_length", max_length=77, return_tensors="pt").input_ids
    hidden = pipe.text_encoder(ids, output_hidden_states=True).hidden_states
    skipped = encode_prompt(pipe, "a green heart", clip_skip=1).prompt_embeds
    assert torch.allclose(skipped, pipe.text_encoder.final_layer_norm(hidden[-2]))
    assert not torch.allclose(skipped, encode_prompt(pipe, "a green heart").prompt_embeds)


def test_sdxl_clip_skip_moves_back_from_penultimate(pipes: dict) -> None:
    pipe = pipes["sdxl"]
    ids = pipe.tokenizer("a cross", padding="max_length", max_length=77, return_tensors="pt").input_ids
    first = pipe.text_encoder(ids, output_hidden_states=True).hidden_states[-3]
    embeds = encode_prompt(pipe, "a cross", clip_skip=1).prompt_embeds
    assert torch.equal(embeds[..., :32], first)


def test_no_guidance_has_no_negative(pipes: dict) -> None:
    assert encode_prompt(pipes["sd1"], "a star", guidance=False).negative_prompt_embeds is None
