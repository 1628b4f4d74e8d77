"""The base's VAE: a small diffusers `AutoencoderKL` trained on Shapes World, 64x64x3 <-> 16x16x4 (x4 down).

Kingma & Welling, "Auto-Encoding Variational Bayes" (arXiv:1312.6114), with the LDM recipe of Rombach et al.
(arXiv:2112.10752, section 3): reconstruction loss plus a tiny KL weight so the latent stays near N(0, I) in scale;
`scaling_factor` = 1 / std of the latents (LDM appendix G), measured after training and stored in the config.
Trained on a mixture of base scenes, emblem scenes and textured scenes so that every concept survives the round
trip. Stored in fp16 as a diffusers folder in `assets/studio-tiny/vae/`, where the embedded base reuses it.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from studio.errors import StudioError
from studio.paths import ASSETS
from studio.world.datasets import random_scene, render_seed
from studio.world.renderer import render, to_model_range
from studio.world.textures import TEXTURES


if TYPE_CHECKING:
    from diffusers import AutoencoderKL


VAE_DIR = ASSETS / "studio-tiny" / "vae"
VAE_CONFIG = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 3,
    "up_block_types": ["UpDecoderBlock2D"] * 3,
    "block_out_channels": [16, 64, 96],
    "layers_per_block": 1,
    "latent_channels": 4,
    "norm_num_groups": 8,
    "sample_size": 64,
}
KL_WEIGHT = 1e-6


def build_vae() -> AutoencoderKL:
    from diffusers import AutoencoderKL

    return AutoencoderKL(**VAE_CONFIG)


def training_images(n: int, seed: int, split: str = "train", texture_heavy: bool = False) -> torch.Tensor:
    """A VAE batch (n, 3, 64, 64) in [0, 1]: half base scenes, a quarter emblems, a quarter textured scenes.

    `texture_heavy` turns the second half of the base scenes into textured ones (a quarter base, a half textured):
    the second stage that teaches the VAE the fine periodic fills (grid, dots) the first stage blurs.
    """
    rng = np.random.default_rng([0x7AE, 1 if split == "train" else 2, seed])
    scenes = []
    for i in range(n):
        kind = i % 4
        k = int(rng.integers(1, 4))
        if kind == 1:
            scenes.append(random_scene(rng, k, emblem_seed=int(rng.integers(0, 1 << 30))))
        elif kind == 2 or (texture_heavy and kind == 3):
            tex = str(rng.choice(TEXTURES[1:]))
            scenes.append(
                random_scene(rng, min(k, 2), texture=tex, background=str(rng.choice(["white", "gray", "beige"])))
            )
        else:
            scenes.append(random_scene(rng, k))
    seeds = [render_seed(split, seed, 900_000 + i) for i in range(n)]
    return render(scenes, seeds)


def load_vae(path: str | Path = VAE_DIR, dtype: torch.dtype = torch.float32) -> AutoencoderKL:
    from diffusers import AutoencoderKL

    path = Path(path)
    if not (path / "config.json").is_file():
        raise StudioError(f"no VAE at {path}; train it with `studio world train-vae`")
    return AutoencoderKL.from_pretrained(path, torch_dtype=dtype).eval()


@torch.no_grad()
def round_trip(images: torch.Tensor, vae=None, batch_size: int = 128) -> torch.Tensor:  # noqa: ANN001
    """Encode (posterior mode) and decode images in [0, 1]; returns (B, 3, 64, 64) in [0, 1]."""
    vae = vae or load_vae()
    out = []
    for chunk in images.split(batch_size):
        x = to_model_range(chunk).to(vae.dtype)
        z = vae.encode(x).latent_dist.mode()  # (b, 4, 16, 16)
        out.append(((vae.decode(z).sample.float() + 1) / 2).clamp(0, 1))
    return torch.cat(out)


def _save(vae, out: Path, summary: dict) -> dict:  # noqa: ANN001
    """Measure the held-out MSE and latent std, set `scaling_factor`, and save atomically in fp16."""
    vae.eval()
    with torch.no_grad():
        x = to_model_range(training_images(256, 0, split="eval"))
        z = vae.encode(x).latent_dist.mode()  # (256, 4, 16, 16)
        mse = (vae.decode(z).sample - x).pow(2).mean().item()
        std = z.std().item()
    vae.train()
    summary = {**summary, "eval_mse": mse, "latent_std": std, "scaling_factor": 1.0 / std}
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    fp16 = build_vae()
    fp16.register_to_config(scaling_factor=round(1.0 / std, 5))
    fp16.load_state_dict(vae.state_dict())
    fp16.to(torch.float16).save_pretrained(tmp, safe_serialization=True)
    for f in tmp.iterdir():
        f.chmod(0o644)
    (tmp / "training.json").write_text(json.dumps(summary, indent=2) + "\n")
    if (out / "README.md").is_file():
        shutil.copy(out / "README.md", tmp / "README.md")
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return summary


def train_vae(
    out: str | Path = VAE_DIR,
    steps: int = 2000,
    batch_size: int = 32,
    lr: float = 6e-4,
    seed: int = 0,
    threads: int = 2,
    log_every: int = 50,
    save_every: int = 500,
    init: str | Path | None = None,
    warmup: int = 100,
    texture_heavy: bool = False,
) -> dict:
    """Train the VAE (seeded, reproducible) and save it atomically in fp16 (also every `save_every` steps).

    `init` continues from a saved VAE folder (a second stage with its own schedule and data seeds).
    """
    from tqdm import tqdm

    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    out = Path(out)
    vae = build_vae().train()
    if init is not None:
        vae.load_state_dict(load_vae(init).float().state_dict())
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    offset = 0 if init is None else 1_000_000  # fresh data seeds for a second stage

    def lr_at(step: int) -> float:  # linear warm-up then cosine to 10%
        if step < warmup:
            return lr * (step + 1) / warmup
        t = (step - warmup) / max(1, steps - warmup)
        return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))

    start = time.time()
    summary: dict = {
        "steps": steps,
        "batch_size": batch_size,
        "lr": lr,
        "seed": seed,
        "init": None if init is None else str(init),
        "texture_heavy": texture_heavy,
    }
    bar = tqdm(range(steps), desc="train-vae")
    for step in bar:
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        x = training_images(batch_size, offset + step, texture_heavy=texture_heavy)
        x = to_model_range(x)  # (B, 3, 64, 64) in [-1, 1]
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.sample()).sample
        # Reconstruction (L1 + MSE keeps edges sharp) plus the LDM KL regulariser with a tiny weight.
        loss_rec = (rec - x).abs().mean() + (rec - x).pow(2).mean()
        loss = loss_rec + KL_WEIGHT * post.kl().mean()
        if not torch.isfinite(loss):
            raise StudioError(f"VAE loss became {loss.item()} at step {step}; lower --lr and train again")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        if step % log_every == 0:
            bar.set_postfix(loss=f"{loss_rec.item():.4f}")
        if save_every and (step + 1) % save_every == 0 and step + 1 < steps:
            _save(vae, out, {**summary, "steps_done": step + 1, "seconds": time.time() - start})
    return _save(vae, out, {**summary, "steps_done": steps, "seconds": time.time() - start})
