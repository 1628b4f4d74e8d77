"""Shared builders for the library tests: kohya / LyCORIS files with random (non-identity) weights."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

from studio.library.formats.keys import to_kohya


# Every module kind the kohya format covers, as diffusers paths on the tiny models (tests/tiny_models.py).
SD1_UNET = [
    "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
    "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_k",
    "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_v",
    "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_out.0",
    "down_blocks.0.attentions.0.transformer_blocks.0.ff.net.0.proj",
    "down_blocks.0.attentions.0.transformer_blocks.0.ff.net.2",
    "down_blocks.0.attentions.0.proj_in",  # 1x1 conv in SD1
    "up_blocks.1.attentions.2.proj_out",
    "down_blocks.1.resnets.0.conv1",  # LoCon 3x3
    "down_blocks.1.resnets.0.conv_shortcut",
    "down_blocks.1.resnets.0.time_emb_proj",
    "down_blocks.0.downsamplers.0.conv",
    "up_blocks.0.upsamplers.0.conv",
    "mid_block.attentions.0.transformer_blocks.0.attn1.to_q",
    "mid_block.resnets.1.conv2",
]
SDXL_UNET = [
    "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q",
    "down_blocks.2.attentions.0.transformer_blocks.1.attn2.to_k",
    "down_blocks.1.attentions.0.transformer_blocks.0.ff.net.0.proj",
    "down_blocks.1.attentions.0.transformer_blocks.0.ff.net.2",
    "down_blocks.1.attentions.0.proj_in",  # linear in SDXL
    "up_blocks.0.attentions.1.proj_out",
    "up_blocks.0.attentions.0.transformer_blocks.1.attn1.to_out.0",
    "down_blocks.1.resnets.0.conv1",
    "down_blocks.1.resnets.0.conv_shortcut",
    "up_blocks.1.resnets.1.time_emb_proj",
    "down_blocks.0.downsamplers.0.conv",
    "up_blocks.0.upsamplers.0.conv",
    "mid_block.attentions.0.transformer_blocks.0.attn2.to_v",
    "mid_block.resnets.1.conv2",
]
TE = [
    "encoder.layers.0.self_attn.q_proj",
    "encoder.layers.1.self_attn.out_proj",
    "encoder.layers.2.mlp.fc1",
    "encoder.layers.2.mlp.fc2",
]


def targets(kind: str) -> list[tuple[str, str]]:
    if kind == "sdxl":
        return (
            [("unet", m) for m in SDXL_UNET]
            + [("text_encoder", m) for m in TE]
            + [("text_encoder_2", f"text_model.{m}") for m in TE]
        )
    return [("unet", m) for m in SD1_UNET] + [("text_encoder", m) for m in TE]


def kohya_stem(component: str, module: str, kind: str, layers_per_block: int) -> str:
    if kind != "sdxl" and component != "text_encoder_2":
        # kohya's own rule for SD1/SD2: the diffusers path with "." -> "_" (text encoders under text_model.)
        return ("lora_unet_" if component == "unet" else "lora_te_text_model_") + module.replace(".", "_")
    return to_kohya(component, module, ldm=True, layers_per_block=layers_per_block, sdxl_te=True)


def make_kohya(
    pipe,
    path: Path,
    kind: str,
    *,
    seed: int = 0,
    rank: int = 4,
    dtype=torch.float32,
    with_alpha: bool = True,
    alpha: float | None = None,
    metadata: dict[str, str] | None = None,
) -> dict[str, torch.Tensor]:
    """A kohya LoRA with random down AND up weights over every module kind, alpha varying per module."""
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    lpb = pipe.unet.config.layers_per_block
    for i, (component, module) in enumerate(targets(kind)):
        layer = getattr(pipe, component).get_submodule(module)
        layer = getattr(layer, "base_layer", layer)  # adapters kept warm in a cached pipeline wrap it
        r = rank + (i % 2)
        if isinstance(layer, torch.nn.Conv2d):
            down = torch.randn(r, layer.in_channels, *layer.kernel_size, generator=g) * 0.2
            up = torch.randn(layer.out_channels, r, 1, 1, generator=g) * 0.2
        else:
            down = torch.randn(r, layer.in_features, generator=g) * 0.2
            up = torch.randn(layer.out_features, r, generator=g) * 0.2
        stem = kohya_stem(component, module, kind, lpb)
        tensors[f"{stem}.lora_down.weight"] = down.to(dtype)
        tensors[f"{stem}.lora_up.weight"] = up.to(dtype)
        if with_alpha:
            tensors[f"{stem}.alpha"] = torch.tensor(
                alpha if alpha is not None else float(r) / (1 + i % 3), dtype=dtype
            )
    save_file(tensors, str(path), metadata=metadata)
    return tensors


def make_lycoris(pipe, path, alpha_dtype=torch.float32) -> dict[str, tuple]:
    """A LyCORIS LoKr file from known factors; returns module -> (w1, w2, scale) per LyCORIS's formula."""
    g = torch.Generator().manual_seed(7)
    tensors, expect = {}, {}
    specs = {  # module: (w1 full?, w2 full?, rank, alpha)
        "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q": (True, False, 2, 3.0),  # 32x32 -> (4,8)(4,8)
        "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k": (True, True, 0, 7.0),  # alpha ignored
        "down_blocks.0.attentions.0.transformer_blocks.0.ff.net.2": (False, False, 1, 0.5),  # 128 -> 32
        "down_blocks.1.resnets.0.conv1": (True, True, 0, 1.0),  # conv 3x3, full factors
    }
    from peft.tuners.lokr.layer import factorization

    for module, (full1, full2, r, alpha) in specs.items():
        layer = pipe.unet.get_submodule(module)
        out_dim = layer.weight.shape[0]
        in_dim = layer.weight.shape[1]
        (a, b), (c, d) = factorization(out_dim), factorization(in_dim)
        k = tuple(layer.weight.shape[2:])
        stem = to_kohya("unet", module, ldm=False)
        if full1:
            w1 = torch.randn(a, c, generator=g)
            tensors[f"{stem}.lokr_w1"] = w1
        else:
            w1a, w1b = torch.randn(a, r, generator=g), torch.randn(r, c, generator=g)
            tensors[f"{stem}.lokr_w1_a"], tensors[f"{stem}.lokr_w1_b"] = w1a, w1b
            w1 = w1a @ w1b
        if full2:
            w2 = torch.randn(b, d, *k, generator=g) * 0.3
            tensors[f"{stem}.lokr_w2"] = w2
        else:
            w2a, w2b = torch.randn(b, r, generator=g), torch.randn(r, d, generator=g) * 0.3
            tensors[f"{stem}.lokr_w2_a"], tensors[f"{stem}.lokr_w2_b"] = w2a, w2b
            w2 = w2a @ w2b
        tensors[f"{stem}.alpha"] = torch.tensor(alpha, dtype=alpha_dtype)
        scale = 1.0 if (full1 and full2) else alpha / r
        expect[module] = (w1.double(), w2.double(), scale)
    save_file(tensors, str(path), metadata={"ss_network_module": "lycoris.kohya"})
    return expect
