"""diffusers LoRA files (`pytorch_lora_weights.safetensors`: `unet.<module>.lora_A.weight`, `text_encoder...`).

Alpha travels in `__metadata__["lora_adapter_metadata"]` (diffusers >= 0.35, `lora_base.py` `_pack_dict_with_prefix`
keys such as `unet.lora_alpha`, `unet.alpha_pattern`); without it alpha = rank. Legacy `.lora.down.weight` /
`.lora_linear_layer.down.weight` keys and `text_model.` text-encoder roots are accepted on import.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save

from studio import atomic
from studio.errors import StudioError
from studio.library.adapter import load_safetensors, validate_state_dict
from studio.library.formats.sd_scripts import Imported, scalar_alpha
from studio.library.meta import (
    AdapterMeta,
    component_configs,
    infer_ranks_and_alphas,
    modules_of,
    ranks_alphas_from_configs,
)


WEIGHT_NAME = "pytorch_lora_weights.safetensors"
_LEGACY = {
    ".lora.down.weight": ".lora_A.weight",
    ".lora.up.weight": ".lora_B.weight",
    ".lora_linear_layer.down.weight": ".lora_A.weight",
    ".lora_linear_layer.up.weight": ".lora_B.weight",
}


def _canonical_key(key: str) -> str:
    for old, new in _LEGACY.items():
        if key.endswith(old):
            key = key[: -len(old)] + new
    key = key.replace(".processor.", ".").replace("to_out_lora", "to_out.0").replace("_lora.", ".")
    for te in ("text_encoder.", "text_encoder_2."):
        if key.startswith(te + "text_model."):
            key = te + key[len(te + "text_model.") :]
    return key


def read_diffusers(path: Path) -> Imported:
    path = Path(path)
    if path.is_dir():
        path = path / WEIGHT_NAME
    tensors, metadata = load_safetensors(path)
    state_dict = {}
    for key, tensor in tensors.items():
        if key.endswith(".alpha"):
            continue
        new = _canonical_key(key)
        if not new.startswith(("unet.", "text_encoder.", "text_encoder_2.")) or not new.endswith(
            (".lora_A.weight", ".lora_B.weight")
        ):
            raise StudioError(f"{path}: tensor {key!r} is not a diffusers LoRA key (unet.<module>.lora_A.weight)")
        state_dict[new] = tensor
    try:
        validate_state_dict(state_dict, "LORA")
    except StudioError as err:
        raise StudioError(f"{path}: {err}") from None
    modules = modules_of(state_dict)
    ranks, alphas = infer_ranks_and_alphas(state_dict)
    raw = metadata.get("lora_adapter_metadata")
    if raw:
        try:
            packed = json.loads(raw)
        except json.JSONDecodeError as err:
            raise StudioError(f"{path}: lora_adapter_metadata is not JSON ({err}); remove it or fix it") from None
        if not isinstance(packed, dict):
            raise StudioError(f"{path}: lora_adapter_metadata is not a JSON object; remove it or fix it")
        configs: dict[str, dict] = {}
        for key, value in packed.items():
            component, _, field = key.partition(".")
            configs.setdefault(component, {})[field] = value
        try:
            _, alphas = ranks_alphas_from_configs(configs, modules)
        except StudioError as err:
            raise StudioError(f"{path}: lora_adapter_metadata: {err}") from None
    for key, tensor in tensors.items():  # `<module>.alpha` tensors written by some converters
        if key.endswith(".alpha"):
            module = _canonical_key(key[: -len(".alpha")] + ".lora_A.weight").removesuffix(".lora_A.weight")
            if module not in ranks:
                raise StudioError(f"{path}: {key} is the alpha of no module in the file")
            alphas[module] = scalar_alpha(path, module, tensor)
    meta = AdapterMeta(
        method="imported", ranks=ranks, alphas=alphas, source={"format": "diffusers", "file": path.name}
    )
    name = path.parent.name if path.name == WEIGHT_NAME else path.stem
    return Imported(name, state_dict, meta)


def write_diffusers(name: str, state_dict: dict[str, torch.Tensor], meta: AdapterMeta, out: Path) -> Path:
    """Write `pytorch_lora_weights.safetensors` (into a folder) or the given `.safetensors` path."""
    if meta.peft_type != "LORA":
        raise StudioError(f"{name!r} is a {meta.peft_type} adapter; diffusers files hold LoRA only, use --format peft")
    out = Path(out)
    if out.suffix != ".safetensors":
        out = out / WEIGHT_NAME
    components = component_configs(meta, modules_of(state_dict))
    packed = {f"{c}.{k}": v for c, cfg in components.items() for k, v in cfg.items() if k != "peft_type"}
    metadata = {"format": "pt", "lora_adapter_metadata": json.dumps(packed, sort_keys=True)}
    atomic.write_bytes(out, save({k: v.contiguous() for k, v in state_dict.items()}, metadata=metadata))
    return out
