"""`benches.random_base`: a published architecture with random weights, as a diffusers folder the studio loads and
generates with (small sizes here; `studio bench gpu --architecture` builds the real ones)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from benches.random_base import random_base
from studio.errors import StudioError
from studio.generate import GenerateConfig, generate
from studio.models import load_pipeline


TEXT = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2}
SMALL = {
    "sd1": {"text_encoder": TEXT,
            "unet": {"block_out_channels": [32, 64, 64, 64], "cross_attention_dim": 32, "layers_per_block": 1}},
    "sdxl": {"text_encoder": TEXT, "text_encoder_2": {**TEXT, "projection_dim": 32},
             "unet": {"block_out_channels": [32, 64, 64], "cross_attention_dim": 64, "layers_per_block": 1,
                      "transformer_layers_per_block": [1, 1, 1], "attention_head_dim": [2, 4, 4],
                      "addition_time_embed_dim": 8, "projection_class_embeddings_input_dim": 80}},
}  # fmt: skip


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_a_random_base_of_the_architecture_loads_and_generates(family: str, tmp_path: Path) -> None:
    overrides = {**SMALL[family], "vae": {"block_out_channels": [32, 32, 32, 32], "layers_per_block": 1}}
    folder = random_base(family, tmp_path / family, overrides=overrides)
    pipe = load_pipeline(str(folder))
    assert type(pipe).__name__ == ("StableDiffusionXLPipeline" if family == "sdxl" else "StableDiffusionPipeline")
    assert list(pipe.unet.config.block_out_channels) == overrides["unet"]["block_out_channels"]
    assert pipe.unet.conv_in.weight.dtype == torch.float32 and pipe.unet.conv_in.weight.std() > 0  # random, not 0
    assert pipe.tokenizer("a red star").input_ids[0] == 49406  # CLIP's own tokenizer
    images = generate(GenerateConfig(prompt="a red star", model=str(folder), steps=2, size="64x64"), pipe=pipe,
                      output_type="np").images
    assert images.shape == (1, 64, 64, 3)


def test_an_unknown_architecture_is_refused(tmp_path: Path) -> None:
    with pytest.raises(StudioError, match="choose one of sd1, sd2, sdxl"):
        random_base("sd3", tmp_path)
