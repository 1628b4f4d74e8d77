"""Module-name conversion between diffusers (canonical) and kohya / LyCORIS flat names.

kohya names a module `lora_unet_<path with "." -> "_">`. For SD1.x/SD2.x the path is the diffusers one; for SDXL
sd-scripts trains its own SGM/LDM UNet, so paths read `input_blocks_4_1_transformer_blocks_0_attn1_to_q`.
The LDM <-> diffusers block arithmetic depends on `layers_per_block` (2 for real SD/SDXL) and follows
diffusers `loaders/lora_conversion_utils.py::_maybe_map_sgm_blocks_to_diffusers` (v0.42).

Text encoders: `lora_te_` (SD1/SD2), `lora_te1_`/`lora_te2_` (SDXL), paths with the classic `text_model.` root,
which transformers 5 dropped from `CLIPTextModel` (canonical names here are `encoder.layers.0.self_attn.q_proj`).
"""

from __future__ import annotations

import re

from studio.errors import StudioError


COMPONENT_PREFIXES = {"text_encoder": "lora_te_", "text_encoder_2": "lora_te2_", "unet": "lora_unet_"}
SDXL_TE_PREFIXES = {"text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_", "unet": "lora_unet_"}

# Multi-word identifiers that kohya's "." -> "_" flattening merges; restored longest first.
_WORDS = sorted(
    [
        "down_blocks",
        "up_blocks",
        "mid_block",
        "transformer_blocks",
        "to_q",
        "to_k",
        "to_v",
        "to_out",
        "proj_in",
        "proj_out",
        "conv_shortcut",
        "time_emb_proj",
        "conv_in",
        "conv_out",
        "time_embedding",
        "linear_1",
        "linear_2",
        "add_embedding",
        "in_layers",
        "out_layers",
        "emb_layers",
        "skip_connection",
        "time_embed",
        "label_emb",
        "input_blocks",
        "output_blocks",
        "middle_block",
        "conv_norm_out",
        "text_model",
        "self_attn",
        "q_proj",
        "k_proj",
        "v_proj",
        "out_proj",
        "final_layer_norm",
        "layer_norm1",
        "layer_norm2",
        "text_projection",
        "token_embedding",
        "position_embedding",
    ],
    key=len,
    reverse=True,
)
_RESNET_TO_LDM = {
    "conv1": "in_layers.2",
    "conv2": "out_layers.3",
    "time_emb_proj": "emb_layers.1",
    "conv_shortcut": "skip_connection",
    "norm1": "in_layers.0",
    "norm2": "out_layers.0",
}
_LDM_TO_RESNET = {v: k for k, v in _RESNET_TO_LDM.items()}
_TOP_TO_LDM = {
    "conv_in": "input_blocks.0.0",
    "conv_out": "out.2",
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
    "conv_norm_out": "out.0",
}
_LDM_TO_TOP = {v: k for k, v in _TOP_TO_LDM.items()}


def _unflatten(stem: str) -> str:
    """`down_blocks_0_attentions_0_proj_in` -> `down_blocks.0.attentions.0.proj_in` (rule based)."""
    dotted = stem.replace("_", ".")
    for word in _WORDS:
        dotted = re.sub(rf"(?<![A-Za-z0-9_]){re.escape(word.replace('_', '.'))}(?![A-Za-z0-9_])", word, dotted)
    return dotted


def unet_to_ldm(module: str, layers_per_block: int) -> str:
    """A diffusers UNet module path -> the SGM/LDM path sd-scripts uses for SDXL."""
    per = layers_per_block + 1
    if module in _TOP_TO_LDM:
        return _TOP_TO_LDM[module]
    parts = module.split(".")
    if parts[0] == "down_blocks":
        block, kind, j, rest = int(parts[1]), parts[2], int(parts[3]), parts[4:]
        if kind == "downsamplers":
            return ".".join([f"input_blocks.{1 + block * per + layers_per_block}.0.op", *rest[1:]])
        head = f"input_blocks.{1 + block * per + j}.{0 if kind == 'resnets' else 1}"
    elif parts[0] == "up_blocks":
        block, kind, j, rest = int(parts[1]), parts[2], int(parts[3]), parts[4:]
        if kind == "upsamplers":
            return ".".join([f"output_blocks.{block * per + layers_per_block}.2", *rest])
        head = f"output_blocks.{block * per + j}.{0 if kind == 'resnets' else 1}"
    elif parts[0] == "mid_block":
        kind, j, rest = parts[1], int(parts[2]), parts[3:]
        head = f"middle_block.{1 if kind == 'attentions' else 2 * j}"
    else:
        raise StudioError(f"no SDXL (LDM) name for UNet module {module!r}; export with a SD1-style naming instead")
    tail = ".".join(rest)
    if kind == "resnets":
        tail = _RESNET_TO_LDM.get(tail, tail)
    return f"{head}.{tail}"


def ldm_to_unet(path: str, layers_per_block: int) -> str:
    """Inverse of `unet_to_ldm` (dotted LDM path in, diffusers module path out)."""
    per = layers_per_block + 1
    if path in _LDM_TO_TOP:
        return _LDM_TO_TOP[path]
    m = re.fullmatch(r"(input_blocks|output_blocks)\.(\d+)\.(\d+)\.(.+)", path) or re.fullmatch(
        r"(middle_block)\.(\d+)\.()(.+)", path
    )
    if not m:
        raise StudioError(f"unknown SDXL (LDM) UNet module {path!r}: not an input/middle/output block path")
    group, index, inner, tail = m.group(1), int(m.group(2)), m.group(3), m.group(4)
    if group == "middle_block":
        head = "mid_block.attentions.0" if index == 1 else f"mid_block.resnets.{index // 2}"
        kind = "attentions" if index == 1 else "resnets"
    elif group == "input_blocks":
        block, j = (index - 1) // per, (index - 1) % per
        if tail.startswith("op"):
            return f"down_blocks.{block}.downsamplers.0.conv{tail[2:]}"
        kind = "resnets" if inner == "0" else "attentions"
        head = f"down_blocks.{block}.{kind}.{j}"
    else:
        block, j = index // per, index % per
        if inner == "2" or (inner == "1" and tail == "conv"):
            return f"up_blocks.{block}.upsamplers.0.{tail}"
        kind = "resnets" if inner == "0" else "attentions"
        head = f"up_blocks.{block}.{kind}.{j}"
    if kind == "resnets":
        tail = _LDM_TO_RESNET.get(tail, tail)
    return f"{head}.{tail}"


def to_kohya(component: str, module: str, *, ldm: bool, layers_per_block: int = 2, sdxl_te: bool = False) -> str:
    """`("unet", "down_blocks.0.attentions.0.proj_in")` -> `lora_unet_down_blocks_0_attentions_0_proj_in`."""
    prefixes = SDXL_TE_PREFIXES if sdxl_te else COMPONENT_PREFIXES
    if component not in prefixes:
        raise StudioError(f"component {component!r} has no kohya name; kohya files hold unet and text encoders")
    if component == "unet":
        path = unet_to_ldm(module, layers_per_block) if ldm else module
    else:
        path = module if module.startswith("text_model.") or module == "text_projection" else f"text_model.{module}"
    return prefixes[component] + path.replace(".", "_")


def from_kohya(
    stem: str, *, layers_per_block: int = 2, known: dict[str, tuple[str, str]] | None = None
) -> tuple[str, str]:
    """`lora_unet_...` -> `(component, diffusers module path)`. `known` maps exact stems when the base is known."""
    if known and stem in known:
        return known[stem]
    for component, prefix in (
        ("text_encoder", "lora_te1_"),
        ("text_encoder", "lora_te_"),
        ("text_encoder_2", "lora_te2_"),
        ("unet", "lora_unet_"),
    ):
        if stem.startswith(prefix):
            path = _unflatten(stem[len(prefix) :])
            break
    else:
        raise StudioError(
            f"unknown kohya module {stem!r}: expected a lora_unet_, lora_te_, lora_te1_ or lora_te2_ name"
        )
    if component == "unet":
        if path.startswith(("input_blocks", "output_blocks", "middle_block", "time_embed", "label_emb", "out.")):
            return component, ldm_to_unet(path, layers_per_block)
        return component, path
    # transformers 5: CLIPTextModel lost its `text_model.` root, CLIPTextModelWithProjection (SDXL's second) kept it.
    return component, path.removeprefix("text_model.") if component == "text_encoder" else path


def is_ldm_stem(stem: str) -> bool:
    return stem.startswith("lora_unet_") and any(
        stem.startswith(f"lora_unet_{p}")
        for p in ("input_blocks", "output_blocks", "middle_block", "time_embed", "label_emb", "out_")
    )
