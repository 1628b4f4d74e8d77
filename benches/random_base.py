"""A base model of a published architecture with random weights: speed at real sizes without any download.

No weights can be fetched here, and timing does not depend on their values: `random_base("sd1", DIR)` writes a
diffusers folder with Stable Diffusion 1.5's UNet, VAE and CLIP text encoder (the configs the studio ships for
single-file loading, `studio/models/configs`), freshly initialised, and CLIP's tokenizer (built offline from
open_clip's vocabulary), so `studio bench gpu --architecture sd1` times generation and regional composition at SD1.5
sizes (512x512, 860M UNet parameters) where studio-tiny is launch-bound. Images from it are noise.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch


FAMILIES = ("sd1", "sd2", "sdxl")


def random_base(family: str, out: Path, *, dtype: torch.dtype = torch.float16, device: str = "cpu",
                overrides: dict[str, dict[str, Any]] | None = None) -> Path:
    """Write a `family` pipeline with random weights to `out` (safetensors in `dtype`); `overrides` change config
    entries per component (small sizes for tests). Returns `out`."""
    from diffusers import AutoencoderKL, StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from studio.errors import StudioError
    from studio.models.single_file import shipped_config, shipped_scheduler, shipped_tokenizer

    if family not in FAMILIES:
        raise StudioError(f"unknown architecture {family!r}; choose one of {', '.join(FAMILIES)}")
    overrides = overrides or {}

    def config(component: str) -> dict[str, Any]:
        return {**shipped_config(family, component), **overrides.get(component, {})}

    torch.manual_seed(0)
    texts = {"text_encoder": CLIPTextModel} | ({"text_encoder_2": CLIPTextModelWithProjection} if family == "sdxl"
                                                else {})  # fmt: skip
    with torch.device(device):
        parts: dict[str, Any] = {name: cls(CLIPTextConfig.from_dict(config(name))) for name, cls in texts.items()}
        parts["unet"] = UNet2DConditionModel.from_config(config("unet"))
        parts["vae"] = AutoencoderKL.from_config(config("vae"))
    parts["scheduler"], parts["tokenizer"] = shipped_scheduler(family), shipped_tokenizer(family)
    if family == "sdxl":
        pipe = StableDiffusionXLPipeline(**parts, tokenizer_2=shipped_tokenizer(family, "tokenizer_2"))
    else:
        pipe = StableDiffusionPipeline(**parts, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
    pipe.to(dtype=dtype).save_pretrained(out, safe_serialization=True)
    return out
