"""What kohya/A1111 LoRA files and LyCORIS files share (both are sd-scripts' `lora_unet_...` naming).

Stems and their grouping, the naming a file uses (diffusers or LDM UNet names, `lora_te_` or `lora_te1_`), import
metadata, export metadata with `ss_*`/`modelspec.*` keys, and the `sshs_*` hashes sd-scripts computes
(library/train_util.py, addnet hashes). `kohya.py` (LoRA) and `lycoris.py` (LoKr) both build on this module and
never on each other.
"""

from __future__ import annotations

import hashlib
import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors.torch import save

from studio import atomic
from studio.errors import StudioError
from studio.library.formats.keys import is_ldm_stem, to_kohya
from studio.library.meta import AdapterMeta, BaseInfo, modules_of


KEPT_PREFIXES = ("ss_", "modelspec.", "sshs_")
_ARCH = {"sd1": "stable-diffusion-v1", "sd2": "stable-diffusion-v2-768-v", "sdxl": "stable-diffusion-xl-v1-base"}
_SS_BASE = {"sd1": "sd_v1", "sd2": "sd_v2_768_v", "sdxl": "sdxl_base_v1-0"}


@dataclass
class Imported:
    """An adapter converted to canonical tensors, ready for `Library.add(name, state_dict, meta)`."""

    name: str
    state_dict: dict[str, torch.Tensor]
    meta: AdapterMeta


def group_stems(tensors: dict[str, torch.Tensor], path: Path) -> dict[str, dict[str, torch.Tensor]]:
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        stem, _, suffix = key.partition(".")
        if not suffix or not stem.startswith(("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")):
            raise StudioError(f"{path}: tensor {key!r} is not a kohya/LyCORIS adapter key; is this a full checkpoint?")
        groups.setdefault(stem, {})[suffix] = tensor
    return groups


def scalar_alpha(path: Path, stem: str, tensor: torch.Tensor) -> float:
    """A stem's `.alpha` as a float: one finite number, or a StudioError naming the file and the stem."""
    if not isinstance(tensor, torch.Tensor) or tensor.numel() != 1 or tensor.dtype == torch.bool:
        raise StudioError(f"{path}: {stem}.alpha must be one number, got a tensor of shape {list(tensor.shape)}")
    value = float(tensor.item())
    if not math.isfinite(value):
        raise StudioError(f"{path}: {stem}.alpha is {value}; the file is damaged")
    return value


def known_stems(pipe: Any, *, ldm: bool, layers_per_block: int, sdxl_te: bool) -> dict[str, tuple[str, str]]:
    """Exact kohya stem -> (component, module) for every Linear/Conv of a pipeline."""
    out = {}
    for component in ("unet", "text_encoder", "text_encoder_2"):
        model = getattr(pipe, component, None)
        if not isinstance(model, torch.nn.Module):
            continue
        wrapped: list[str] = []  # PEFT layers (adapters loaded or kept warm): their base layer is the module
        for name, module in model.named_modules():
            if any(name.startswith(f"{w}.") for w in wrapped):
                continue
            if isinstance(module, BaseTunerLayer):
                wrapped.append(name)
                module = module.get_base_layer()
            if isinstance(module, torch.nn.Linear | torch.nn.Conv2d):
                try:
                    stem = to_kohya(component, name, ldm=ldm, layers_per_block=layers_per_block, sdxl_te=sdxl_te)
                except StudioError:
                    continue
                out[stem] = (component, name)
    return out


def naming_info(stems: list[str], metadata: dict[str, str]) -> dict[str, Any]:
    ldm = any(is_ldm_stem(s) for s in stems)
    te1 = any(s.startswith(("lora_te1_", "lora_te2_")) for s in stems)
    version = metadata.get("ss_base_model_version", "") + metadata.get("modelspec.architecture", "")
    if ldm or te1 or "xl" in version:
        family = "sdxl"
    elif "v2" in version or metadata.get("ss_v2") == "True":
        family = "sd2"
    elif "v1" in version:
        family = "sd1"
    else:
        family = "unknown"
    return {"naming": "ldm" if ldm else "diffusers", "te_prefix": "te1" if te1 else "te", "family": family}


def import_meta(path: Path, metadata: dict[str, str], family: str, source: dict[str, Any]) -> AdapterMeta:
    kept = {k: v for k, v in metadata.items() if k.startswith(KEPT_PREFIXES)}
    trigger = metadata.get("modelspec.trigger_phrase", "")
    tags = [t.strip() for t in metadata.get("modelspec.tags", "").split(",") if t.strip()]
    return AdapterMeta(
        method="imported",
        kind="unknown",
        trigger_words=[t.strip() for t in trigger.split(",") if t.strip()],
        tags=tags,
        description=metadata.get("modelspec.description", ""),
        base=BaseInfo(family=family, name=metadata.get("ss_sd_model_name", "")),
        source={"format": source.pop("format"), "file": Path(path).name, "metadata": kept, **source},
    )


def export_naming(meta: AdapterMeta, modules: list[str]) -> dict[str, Any]:
    src = meta.source
    ldm = meta.base.family == "sdxl" or src.get("naming") == "ldm"
    sdxl_te = ldm or src.get("te_prefix") == "te1" or any(m.startswith("text_encoder_2.") for m in modules)
    lpb = meta.base.layers_per_block if meta.base.fingerprint else int(src.get("layers_per_block", 2))
    return {"ldm": ldm, "sdxl_te": sdxl_te, "layers_per_block": lpb}


def stem_of(full: str, naming: dict[str, Any]) -> str:
    component, module = full.split(".", 1)
    return to_kohya(component, module, **naming)


def export_metadata(name: str, meta: AdapterMeta, modules: list[str], network_module: str) -> dict[str, str]:
    kept = dict(meta.source.get("metadata") or {})
    family = meta.base.family
    ranks = sorted(meta.ranks.values())
    defaults = {
        "ss_output_name": name,
        "ss_network_module": network_module,
        "ss_network_dim": str(max(set(ranks), key=ranks.count)) if ranks else "0",
        "ss_network_alpha": str(max(set(meta.alphas.values()), key=list(meta.alphas.values()).count)),
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.title": name,
        "modelspec.implementation": "https://github.com/Stability-AI/generative-models"
        if family == "sdxl"
        else "diffusers",
    }
    if family in _ARCH:
        defaults["ss_base_model_version"] = _SS_BASE[family]
        defaults["modelspec.architecture"] = f"{_ARCH[family]}/{'lora' if meta.peft_type == 'LORA' else 'lycoris'}"
    if meta.description:
        defaults["modelspec.description"] = meta.description
    out = {**defaults, **kept}
    kept_triggers = [t.strip() for t in kept.get("modelspec.trigger_phrase", "").split(",") if t.strip()]
    if meta.trigger_words and kept_triggers != meta.trigger_words:
        out["modelspec.trigger_phrase"] = ", ".join(meta.trigger_words)
    kept_tags = [t.strip() for t in kept.get("modelspec.tags", "").split(",") if t.strip()]
    if meta.tags and kept_tags != meta.tags:
        out["modelspec.tags"] = ", ".join(meta.tags)
    return out


def serialize_with_hashes(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> bytes:
    """safetensors bytes with `sshs_model_hash` (sha256 of the data after the header) and `sshs_legacy_hash`."""
    ss_only = {k: v for k, v in metadata.items() if k.startswith("ss_")}
    blob = save(tensors, metadata=ss_only or None)
    (header_len,) = struct.unpack("<Q", blob[:8])
    model_hash = hashlib.sha256(blob[8 + header_len :]).hexdigest()
    legacy = hashlib.sha256(blob[0x100000 : 0x100000 + 0x10000]).hexdigest()[:8]
    return save(tensors, metadata={**metadata, "sshs_model_hash": model_hash, "sshs_legacy_hash": legacy})


def write_lora_file(name: str, state_dict: dict[str, torch.Tensor], meta: AdapterMeta, out: Path) -> Path:
    """A LoRA adapter as a kohya `.safetensors` file (also LyCORIS's LoCon layout)."""
    modules = modules_of(state_dict)
    naming = export_naming(meta, modules)
    src = meta.source if meta.source.get("format") == "kohya" else {}
    tensors: dict[str, torch.Tensor] = {}
    for full in modules:
        stem = stem_of(full, naming)
        down, up = state_dict[f"{full}.lora_A.weight"], state_dict[f"{full}.lora_B.weight"]
        tensors[f"{stem}.lora_down.weight"] = down.contiguous()
        tensors[f"{stem}.lora_up.weight"] = up.contiguous()
        if src.get("has_alpha", True):
            dtype = getattr(torch, src.get("alpha_dtype") or "") if src.get("alpha_dtype") else down.dtype
            tensors[f"{stem}.alpha"] = torch.tensor(meta.alphas[full], dtype=dtype)
    metadata = export_metadata(name, meta, modules, "networks.lora")
    out = file_target(Path(out), name)
    atomic.write_bytes(out, serialize_with_hashes(tensors, metadata))
    return out


def file_target(out: Path, name: str) -> Path:
    if out.is_dir() or (not out.suffix and not out.exists()):
        out.mkdir(parents=True, exist_ok=True)
        return out / f"{name}.safetensors"
    if out.suffix != ".safetensors":
        raise StudioError(f"--out {out} must be a folder or a .safetensors file")
    return out
