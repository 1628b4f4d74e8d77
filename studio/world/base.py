"""The embedded base `studio-tiny`: its architecture and how a trained run becomes a standard diffusers folder.

An SD-architecture latent diffusion model (Rombach et al., arXiv:2112.10752) of Shapes World: the world VAE
(64x64x3 <-> 16x16x4), a `UNet2DConditionModel` on 16x16 latents, a transformers `CLIPTextModel` initialised from
the world CLIP's text tower (the way SD starts from a pretrained CLIP), the real CLIP BPE tokenizer and a DDIM
scheduler with SD's configuration. `export_base` writes a folder `StableDiffusionPipeline.from_pretrained` loads
with no other argument.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from studio.errors import StudioError
from studio.paths import ASSETS
from studio.world.clip import TEXT_CFG


if TYPE_CHECKING:
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel


BASE_DIR = ASSETS / "studio-tiny"
MAX_SHARD = "15MB"  # no shipped file over 16 MiB
KEEP = ("vae/README.md", "vae/training.json")  # files of an existing folder that an export carries over

# Cross-attention at every resolution (16x16, 8x8, 4x4), as version 1 ships. Version 0 had none at 16x16 (like SDXL's
# first block) and never learned position words; the finer maps alone did not fix that (the causes, the noise schedule,
# Min-SNR's zero weight at pure noise and 64 padding states in the context, are in the model card), but composers read
# placement off these maps.
UNET_CONFIG = {
    "sample_size": 16,
    "in_channels": 4,
    "out_channels": 4,
    "block_out_channels": [64, 128, 192],
    "layers_per_block": 1,
    "down_block_types": ["CrossAttnDownBlock2D"] * 3,
    "up_block_types": ["CrossAttnUpBlock2D"] * 3,
    "cross_attention_dim": TEXT_CFG["width"],
    "attention_head_dim": 8,  # diffusers' name for the number of heads
    "norm_num_groups": 32,
}

# SD's noise schedule; DDIM sampling with SD's settings (a DDPM-derived config would clip x0 to [-1, 1], which is
# wrong for latents and washes images out).
SCHEDULER_CONFIG = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "prediction_type": "epsilon",
}


def build_unet(config: dict | None = None) -> UNet2DConditionModel:
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(**(config or UNET_CONFIG))


# Lin et al., "Common Diffusion Noise Schedules and Sample Steps are Flawed" (arXiv:2305.08891): SD's schedule ends at
# SNR 0.0047, so the noisiest training input still shows where objects are and the model learns to take layout
# from the noise; sampling from pure noise then lets the seed, not the prompt, place objects. Their fix: betas
# rescaled to zero terminal SNR (section 3.1), v-prediction (3.2), sampling from the last timestep (3.3).
ZERO_SNR = {"prediction_type": "v_prediction", "rescale_betas_zero_snr": True, "timestep_spacing": "trailing"}


def sampling_scheduler(overrides: dict | None = None) -> DDIMScheduler:  # the shipped sampler
    from diffusers import DDIMScheduler

    return DDIMScheduler(**{**SCHEDULER_CONFIG, **(overrides or {})})


def initial_text_encoder(clip_dir: str | Path | None = None) -> CLIPTextModel:
    """The world CLIP's text tower as a `CLIPTextModel` (float32)."""
    from studio.world.clip import CLIP_DIR, load_clip, to_clip_text_model

    return to_clip_text_model(load_clip(str(clip_dir or CLIP_DIR)))


def assemble(unet: UNet2DConditionModel, text_encoder: CLIPTextModel, vae: AutoencoderKL,
             scheduler: dict | None = None, max_length: int = 77) -> StableDiffusionPipeline:
    """A `StableDiffusionPipeline` of the parts, with the real CLIP tokenizer and the DDIM scheduler.

    `max_length` is the tokenizer's context (prompts are padded to it): under 77, fewer end-of-text states share the
    cross-attention with the prompt's words. It is saved with the tokenizer, so every pipeline keeps it.
    """
    from diffusers import StableDiffusionPipeline

    from studio.models.tokenizer import clip_tokenizer

    tokenizer = clip_tokenizer()
    tokenizer.model_max_length = max_length
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=sampling_scheduler(scheduler),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def export_base(pipe, out: str | Path, card: str | None = None, extra: dict | None = None) -> Path:  # noqa: ANN001
    """Write `pipe` as a standard diffusers folder in fp16 (loaded as fp32 on CPU), no file over 16 MiB.

    The folder is staged beside `out` and renamed into place, so a reader never sees half a model. `extra` lands
    in `studio.json` (recommended guidance, training summary); `card` is the model card `README.md`.
    """
    out = Path(out)
    stage = out.with_name(f".{out.name}.staging")
    shutil.rmtree(stage, ignore_errors=True)
    pipe.to(torch.float16).save_pretrained(stage, safe_serialization=True, max_shard_size=MAX_SHARD)
    pipe.to(torch.float32)
    # transformers 5 loads in the dtype the config names ("auto"): name float32, so that
    # `from_pretrained(folder)` with no other argument gives a float32 model, like diffusers' parts.
    text_config = stage / "text_encoder" / "config.json"
    text_config.write_text(json.dumps({**json.loads(text_config.read_text()), "dtype": "float32"}, indent=2) + "\n")
    for config in stage.rglob("config.json"):  # a part loaded from disk remembers where: not this machine's business
        data = json.loads(config.read_text())
        if data.pop("_name_or_path", None) is not None:
            config.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    for f in stage.rglob("*.safetensors"):
        f.chmod(0o644)  # shards are written as private temporaries
        if f.stat().st_size > 16 * 2**20:
            raise StudioError(f"{f} is over 16 MiB; lower MAX_SHARD")
    for rel in KEEP:
        if (out / rel).is_file():
            shutil.copy(out / rel, stage / rel)
    if extra is not None:
        (stage / "studio.json").write_text(json.dumps(extra, indent=2) + "\n")
    if card is not None:
        (stage / "README.md").write_text(card)
    old = out.with_name(f".{out.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if out.exists():
        out.rename(old)
    stage.rename(out)
    shutil.rmtree(old, ignore_errors=True)
    return out


def recommended_guidance(model_dir: str | Path) -> float | None:
    """The guidance a studio-trained model recommends (its `studio.json`), or None."""
    path = Path(model_dir) / "studio.json"
    if not path.is_file():
        return None
    value = json.loads(path.read_text()).get("guidance")
    return float(value) if value is not None else None
