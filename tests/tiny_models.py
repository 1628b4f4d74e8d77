"""Tiny SD1-, SD2- and SDXL-like pipelines built from configs, with the real block names.

Seeded, a few MB each, CPU-fast. The text encoders use the real CLIP vocabulary size (49,408) so that the real
tokenizer from `studio.models.tokenizer` drives them. `save_tiny(kind, folder)` writes a standard diffusers folder
that the studio's public loader reads back.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    EulerDiscreteScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from studio.models.tokenizer import clip_tokenizer


KINDS = ("sd1", "sd2", "sdxl")


def _text_config(hidden: int = 32, act: str = "quick_gelu", projection_dim: int = 32) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=49408,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=3,
        num_attention_heads=4,
        max_position_embeddings=77,
        hidden_act=act,
        projection_dim=projection_dim,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407,
    )


def _vae() -> AutoencoderKL:
    torch.manual_seed(0)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(32, 32),
        latent_channels=4,
        norm_num_groups=32,
        sample_size=32,
    )


def _scheduler(prediction_type: str = "epsilon") -> DDIMScheduler:
    return DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type=prediction_type,
    )


def tiny_sd1() -> StableDiffusionPipeline:
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=16,
        block_out_channels=(32, 64, 64),
        layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=32,
    )
    torch.manual_seed(0)
    text_encoder = CLIPTextModel(_text_config())
    return StableDiffusionPipeline(
        vae=_vae(),
        text_encoder=text_encoder,
        tokenizer=clip_tokenizer(),
        unet=unet,
        scheduler=_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def tiny_sd2() -> StableDiffusionPipeline:
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=16,
        block_out_channels=(32, 64, 64),
        layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=(4, 8, 8),
        use_linear_projection=True,
        norm_num_groups=32,
    )
    torch.manual_seed(0)
    text_encoder = CLIPTextModel(_text_config(act="gelu"))
    return StableDiffusionPipeline(
        vae=_vae(),
        text_encoder=text_encoder,
        tokenizer=clip_tokenizer(),
        unet=unet,
        scheduler=_scheduler("v_prediction"),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def tiny_sdxl() -> StableDiffusionXLPipeline:
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=16,
        block_out_channels=(32, 64, 64),
        layers_per_block=1,
        # SDXL: no attention in the first down block, so up_blocks.0 holds attentions.0/1 at the lowest resolution.
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 1, 2),
        cross_attention_dim=64,
        attention_head_dim=(2, 4, 8),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=32 + 6 * 8,
        norm_num_groups=32,
    )
    torch.manual_seed(0)
    text_encoder = CLIPTextModel(_text_config())
    torch.manual_seed(1)
    text_encoder_2 = CLIPTextModelWithProjection(_text_config(act="gelu"))
    return StableDiffusionXLPipeline(
        vae=_vae(),
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=clip_tokenizer(),
        tokenizer_2=clip_tokenizer(),
        unet=unet,
        scheduler=EulerDiscreteScheduler(
            beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1
        ),
    )


BUILDERS = {"sd1": tiny_sd1, "sd2": tiny_sd2, "sdxl": tiny_sdxl}


def save_tiny(kind: str, folder: Path) -> Path:
    """Write the tiny `kind` pipeline as a diffusers folder (safetensors) and return the folder."""
    pipe = BUILDERS[kind]()
    pipe.save_pretrained(folder, safe_serialization=True)
    return Path(folder)
