"""The shipped world assets: fp16, within budget, the VAE's shape and scaling factor, the CLIP text tower's size."""

from __future__ import annotations

import json

import pytest
import torch

from studio.world.clip import CLIP_DIR
from studio.world.vae import VAE_DIR


def _size(path) -> int:  # noqa: ANN001
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def test_vae_round_trip_shapes_and_budget() -> None:
    if not (VAE_DIR / "config.json").is_file():
        pytest.skip("VAE not trained yet")
    from safetensors import safe_open

    from studio.world import render, sample_scenes
    from studio.world.vae import load_vae, round_trip

    config = json.loads((VAE_DIR / "config.json").read_text())
    assert 0.3 < config["scaling_factor"] < 3.0
    assert _size(VAE_DIR) < 4 * 2**20
    base = VAE_DIR.parent  # the embedded base ships whole: under 48 MiB, no file over 16 MiB, no machine's paths
    assert (base / "model_index.json").is_file() and (base / "README.md").is_file()
    assert _size(base) < 48 * 2**20 and max(f.stat().st_size for f in base.rglob("*") if f.is_file()) < 16 * 2**20
    assert not any("_name_or_path" in json.loads(f.read_text()) for f in base.rglob("config.json"))
    with safe_open(str(VAE_DIR / "diffusion_pytorch_model.safetensors"), "pt") as f:
        assert all(f.get_tensor(k).dtype == torch.float16 for k in f.keys())
    vae = load_vae()
    x = render(sample_scenes(2, 0, split="eval"), seed=0)
    z = vae.encode(x * 2 - 1).latent_dist.mode()
    assert z.shape == (2, 4, 16, 16)
    y = round_trip(x, vae)
    assert y.shape == x.shape and (y - x).abs().mean() < 0.1


def test_clip_budget_and_text_tower_shape() -> None:
    if not (CLIP_DIR / "model.safetensors").is_file():
        pytest.skip("world CLIP not trained yet")
    from studio.world.clip import to_clip_text_model

    assert _size(CLIP_DIR) < 12 * 2**20
    text = to_clip_text_model()
    assert text.config.vocab_size == 49408 and text.config.max_position_embeddings == 77
    assert text.config.hidden_act == "quick_gelu" and text.config.eos_token_id == 49407
