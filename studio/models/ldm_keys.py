"""The original (LDM / CompVis / A1111) single-file layout of SD1.x, SD2.x and SDXL: key names and sizes.

UNet and VAE: diffusers' own converters (`diffusers.loaders.single_file_utils`) go original -> diffusers; this module
is their inverse (diffusers -> original), used to export and to check a file's key set before converting.
Text encoders are mapped both ways here, because diffusers' helpers assume the `text_model.` wrapper that
transformers 5 removed from `CLIPTextModel`. "HF keys" below are `CLIPTextModel` keys without any `text_model.`
prefix (`embeddings.token_embedding.weight`, `encoder.layers.0.self_attn.q_proj.weight`, `text_projection.weight`).
The `infer_*` functions read the sizes of a diffusers config from the tensor shapes of an original-layout part.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from studio.errors import StudioError


UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
SD1_TEXT_PREFIX = "cond_stage_model.transformer.text_model."
SD2_TEXT_PREFIX = "cond_stage_model.model."
SDXL_TEXT_PREFIX = "conditioner.embedders.0.transformer.text_model."
SDXL_TEXT2_PREFIX = "conditioner.embedders.1.model."
# Keys an OpenCLIP text tower may carry that no diffusers text encoder uses.
OPENCLIP_IGNORED = ("logit_scale", "attn_mask")

_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "time_emb_proj": "emb_layers.1",
    "conv_shortcut": "skip_connection",
}
_UNET_TOP = {
    "conv_in.": "input_blocks.0.0.",
    "time_embedding.linear_1.": "time_embed.0.",
    "time_embedding.linear_2.": "time_embed.2.",
    "add_embedding.linear_1.": "label_emb.0.0.",
    "add_embedding.linear_2.": "label_emb.0.2.",
    "conv_norm_out.": "out.0.",
    "conv_out.": "out.2.",
}
_VAE_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _resnet(rest: str) -> str:
    head, _, tail = rest.partition(".")
    return f"{_RESNET.get(head, head)}.{tail}"


def unet_key_to_ldm(key: str, layers_per_block: int, up_has_attention: Sequence[bool]) -> str:
    """`down_blocks.1.attentions.0.proj_in.weight` -> `input_blocks.4.1.proj_in.weight` (no `model.` prefix)."""
    n = layers_per_block + 1  # original blocks per level: the resnets plus one down/upsampler slot
    if m := re.fullmatch(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
        level, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        index = 1 + level * n + j
        return f"input_blocks.{index}.0.{_resnet(rest)}" if kind == "resnets" else f"input_blocks.{index}.1.{rest}"
    if m := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", key):
        return f"input_blocks.{(int(m[1]) + 1) * n}.0.op.{m[2]}"
    if m := re.fullmatch(r"mid_block\.resnets\.(\d+)\.(.+)", key):
        return f"middle_block.{2 * int(m[1])}.{_resnet(m[2])}"
    if m := re.fullmatch(r"mid_block\.attentions\.0\.(.+)", key):
        return f"middle_block.1.{m[1]}"
    if m := re.fullmatch(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
        level, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        index = level * n + j
        return f"output_blocks.{index}.0.{_resnet(rest)}" if kind == "resnets" else f"output_blocks.{index}.1.{rest}"
    if m := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", key):
        level = int(m[1])
        slot = 2 if up_has_attention[level] else 1
        return f"output_blocks.{level * n + n - 1}.{slot}.conv.{m[2]}"
    for name, ldm in _UNET_TOP.items():
        if key.startswith(name):
            return ldm + key[len(name) :]
    raise KeyError(f"no original-layout name for UNet key {key!r}")


def vae_key_to_ldm(key: str, num_levels: int) -> str:
    """`decoder.up_blocks.0.resnets.1.conv1.weight` -> `decoder.up.3.block.1.conv1.weight` (no prefix)."""
    if m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
        return f"encoder.down.{m[1]}.block.{m[2]}.{m[3].replace('conv_shortcut', 'nin_shortcut')}"
    if m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", key):
        return f"encoder.down.{m[1]}.downsample.conv.{m[2]}"
    if m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
        rest = m[3].replace("conv_shortcut", "nin_shortcut")
        return f"decoder.up.{num_levels - 1 - int(m[1])}.block.{m[2]}.{rest}"  # original counts up blocks upwards
    if m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", key):
        return f"decoder.up.{num_levels - 1 - int(m[1])}.upsample.conv.{m[2]}"
    if m := re.fullmatch(r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.+)", key):
        return f"{m[1]}.mid.block_{int(m[2]) + 1}.{m[3].replace('conv_shortcut', 'nin_shortcut')}"
    if m := re.fullmatch(
        r"(encoder|decoder)\.mid_block\.attentions\.0\.(group_norm|to_q|to_k|to_v|to_out\.0)\.(.+)", key
    ):
        return f"{m[1]}.mid.attn_1.{_VAE_ATTN[m[2]]}.{m[3]}"
    if m := re.fullmatch(r"(encoder|decoder)\.conv_norm_out\.(.+)", key):
        return f"{m[1]}.norm_out.{m[2]}"
    if re.fullmatch(r"(encoder|decoder)\.conv_(in|out)\.(weight|bias)|(post_)?quant_conv\.(weight|bias)", key):
        return key
    raise KeyError(f"no original-layout name for VAE key {key!r}")


def vae_tensor_to_ldm(ldm_key: str, tensor: torch.Tensor) -> torch.Tensor:
    """The original VAE attention uses 1x1 convolutions where diffusers uses linear layers."""
    if ".mid.attn_1." in ldm_key and ldm_key.endswith(".weight") and tensor.ndim == 2:
        return tensor[:, :, None, None]
    return tensor


# --- text encoders --------------------------------------------------------------------------------------------

_OPENCLIP_LAYER = {
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
    "self_attn.out_proj": "attn.out_proj",
}
_QKV = ("q_proj", "k_proj", "v_proj")
_OPENCLIP_FIXED = {
    "token_embedding.weight": "embeddings.token_embedding.weight",
    "positional_embedding": "embeddings.position_embedding.weight",
    "ln_final.weight": "final_layer_norm.weight",
    "ln_final.bias": "final_layer_norm.bias",
}
_HF_FIXED = {v: k for k, v in _OPENCLIP_FIXED.items()} | {"text_projection.weight": "text_projection"}


def hf_key_to_openclip(key: str) -> tuple[str, int | None]:
    """HF key -> (OpenCLIP key, q/k/v index into the fused `in_proj_*` tensor or None)."""
    if key in _HF_FIXED:
        return _HF_FIXED[key], None
    m = re.fullmatch(r"encoder\.layers\.(\d+)\.(.+)\.(weight|bias)", key)
    if m is None:
        raise KeyError(f"no OpenCLIP name for text encoder key {key!r}")
    layer, module, param = m[1], m[2], m[3]
    prefix = f"transformer.resblocks.{layer}."
    if module.startswith("self_attn.") and module.split(".")[1] in _QKV:
        return f"{prefix}attn.in_proj_{param}", _QKV.index(module.split(".")[1])
    if module in _OPENCLIP_LAYER:
        return f"{prefix}{_OPENCLIP_LAYER[module]}.{param}", None
    raise KeyError(f"no OpenCLIP name for text encoder key {key!r}")


def hf_to_openclip(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """HF text encoder state dict -> OpenCLIP tower keys (fused q/k/v, `text_projection` as `x @ P`)."""
    out: dict[str, torch.Tensor] = {}
    fused: dict[str, list[torch.Tensor | None]] = {}
    for key, tensor in state.items():
        name, part = hf_key_to_openclip(key)
        if part is not None:
            fused.setdefault(name, [None, None, None])[part] = tensor
        elif name == "text_projection":
            out[name] = tensor.T.contiguous()  # nn.Linear stores (out, in); OpenCLIP multiplies x @ P with P (in, out)
        else:
            out[name] = tensor
    for name, parts in fused.items():
        if any(p is None for p in parts):
            raise KeyError(f"text encoder has only part of the q/k/v weights for {name!r}")
        out[name] = torch.cat(parts, dim=0)  # type: ignore[arg-type]
    return out


def openclip_to_hf(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """OpenCLIP tower keys (without prefix) -> HF keys; an unknown key raises `KeyError(key)`."""
    reverse = {v: k for k, v in _OPENCLIP_LAYER.items()}
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        if m := re.fullmatch(r"transformer\.resblocks\.(\d+)\.attn\.in_proj_(weight|bias)", key):
            for name, chunk in zip(_QKV, tensor.chunk(3, dim=0), strict=True):  # fused (3 * hidden, ...) -> 3 x hidden
                out[f"encoder.layers.{m[1]}.self_attn.{name}.{m[2]}"] = chunk.contiguous()
        elif m := re.fullmatch(r"transformer\.resblocks\.(\d+)\.(.+)\.(weight|bias)", key):
            out[f"encoder.layers.{m[1]}.{reverse.get(m[2], m[2])}.{m[3]}"] = tensor
        elif key == "text_projection":
            out["text_projection.weight"] = tensor.T.contiguous()
        else:
            out[_OPENCLIP_FIXED[key]] = tensor
    return out


def openclip_num_layers(keys: Sequence[str] | set[str]) -> int:
    """The number of residual blocks in an OpenCLIP tower, from its (prefix-free) key names."""
    layers = {int(m[1]) for k in keys if (m := re.match(r"transformer\.resblocks\.(\d+)\.", k))}
    return max(layers) + 1 if layers else 0


# --- what the shapes reveal ------------------------------------------------------------------------------------------


def infer_unet_config(
    ldm: dict[str, torch.Tensor], base: dict[str, Any], family: str, heads_known: bool = False
) -> dict[str, Any]:
    """`base` with every size the original UNet tensors reveal (`ldm`: keys without `model.diffusion_model.`).

    Head counts leave no trace in the shapes: unless `heads_known`, SD2/SDXL get one head per 64 channels.
    """
    cfg = dict(base)
    try:
        conv_in, conv_out = ldm["input_blocks.0.0.weight"], ldm["out.2.weight"]
    except KeyError as err:
        raise StudioError(
            f"the UNet has no {err.args[0]!r} weight; the checkpoint is incomplete, re-download it"
        ) from err
    inputs = {int(k.split(".")[1]) for k in ldm if k.startswith("input_blocks.")}
    ops = sorted(i for i in inputs if f"input_blocks.{i}.0.op.weight" in ldm)
    per_level = ops[0] if ops else max(inputs) + 1  # resnets per level + 1 slot for the downsampler
    levels = len(ops) + 1
    if max(inputs) + 1 != levels * per_level:
        raise StudioError("the UNet's input blocks do not form a Stable Diffusion layout; is this an SD checkpoint?")
    first = [1 + level * per_level for level in range(levels)]
    channels = [int(ldm[f"input_blocks.{i}.0.out_layers.3.weight"].shape[0]) for i in first]
    attention = [f"input_blocks.{i}.1.proj_in.weight" in ldm for i in first]
    depth = [
        len({k.split(".")[4] for k in ldm if k.startswith(f"input_blocks.{i}.1.transformer_blocks.")}) or 1
        for i in first
    ]
    context = [v.shape[1] for k, v in ldm.items() if k.endswith("attn2.to_k.weight")]
    cfg.update(
        in_channels=int(conv_in.shape[1]),
        out_channels=int(conv_out.shape[0]),
        block_out_channels=channels,
        layers_per_block=per_level - 1,
        down_block_types=["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attention],
        up_block_types=["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention)],
        transformer_layers_per_block=depth if len(set(depth)) > 1 else depth[0],
        use_linear_projection=any(v.ndim == 2 for k, v in ldm.items() if k.endswith("proj_in.weight")),
    )
    if context:
        cfg["cross_attention_dim"] = int(context[0])
    if "label_emb.0.0.weight" in ldm:
        cfg["projection_class_embeddings_input_dim"] = int(ldm["label_emb.0.0.weight"].shape[1])
    if family != "sd1" and not heads_known:
        cfg["attention_head_dim"] = [max(1, c // 64) for c in channels]  # SD2 / SDXL use 64-channel heads
    if cfg["in_channels"] != 4:
        raise StudioError(
            f"the UNet takes {cfg['in_channels']} input channels (an inpainting or edit model); "
            "the studio supports text-to-image checkpoints with 4 latent channels"
        )
    return cfg


def infer_vae_config(ldm: dict[str, torch.Tensor], base: dict[str, Any]) -> dict[str, Any]:
    """`base` with the sizes the original VAE tensors reveal (`ldm`: keys without `first_stage_model.`)."""
    cfg = dict(base)
    try:
        levels = len({k.split(".")[2] for k in ldm if k.startswith("encoder.down.")})
        channels = [int(ldm[f"encoder.down.{i}.block.0.conv2.weight"].shape[0]) for i in range(levels)]
        cfg.update(
            in_channels=int(ldm["encoder.conv_in.weight"].shape[1]),
            out_channels=int(ldm["decoder.conv_out.weight"].shape[0]),
            latent_channels=int(ldm["decoder.conv_in.weight"].shape[1]),
            block_out_channels=channels,
            layers_per_block=len({k.split(".")[4] for k in ldm if k.startswith("encoder.down.0.block.")}),
            down_block_types=["DownEncoderBlock2D"] * levels,
            up_block_types=["UpDecoderBlock2D"] * levels,
        )
    except KeyError as err:
        raise StudioError(
            f"the VAE has no {err.args[0]!r} weight; the checkpoint is incomplete, re-download it"
        ) from err
    return cfg


def infer_text_config(hf: dict[str, torch.Tensor], base: dict[str, Any], heads_known: bool) -> dict[str, Any]:
    """`base` with the sizes of an HF-keyed text encoder state dict; heads guessed as hidden / 64 when unknown."""
    cfg = dict(base)
    try:
        vocab, hidden = hf["embeddings.token_embedding.weight"].shape
        cfg.update(
            vocab_size=int(vocab),
            hidden_size=int(hidden),
            max_position_embeddings=int(hf["embeddings.position_embedding.weight"].shape[0]),
            intermediate_size=int(hf["encoder.layers.0.mlp.fc1.weight"].shape[0]),
            num_hidden_layers=len({k.split(".")[2] for k in hf if k.startswith("encoder.layers.")}),
        )
    except KeyError as err:
        raise StudioError(
            f"the text encoder has no {err.args[0]!r} weight; the checkpoint is incomplete, re-download it"
        ) from err
    if "text_projection.weight" in hf:
        cfg["projection_dim"] = int(hf["text_projection.weight"].shape[0])
    if not heads_known and hidden != base.get("hidden_size"):
        cfg["num_attention_heads"] = max(1, int(hidden) // 64)  # every public CLIP text tower uses 64-wide heads
    return cfg
