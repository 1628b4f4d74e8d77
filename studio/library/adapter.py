"""One adapter folder on disk: write it (`save_adapter`) and read it back (`read_adapter`, `read_meta`).

Layout (DESIGN.md section 4): `adapter_config.json` (a plain PEFT config of the UNet component, or of the only
component), `studio.json` (the studio's fields and every component's PEFT config; beside the PEFT config rather than
inside it, where PEFT would warn about an unknown key on every read; folders written with a `"studio"` key inside
`adapter_config.json` are still read), `adapter_model.safetensors`
(canonical diffusers-PEFT keys; `__metadata__` carries `lora_adapter_metadata` for diffusers' `load_lora_weights`
and the key studio facts as str -> str), `README.md`, `train_config.json`, `samples/*.png`.
"""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save

from studio import atomic
from studio.errors import StudioError
from studio.library.meta import (
    LOKR_PARAMS,
    AdapterMeta,
    component_configs,
    from_studio_dict,
    modules_of,
    split_key,
    to_studio_dict,
)


CONFIG_NAME = "adapter_config.json"
STUDIO_NAME = "studio.json"
WEIGHTS_NAME = "adapter_model.safetensors"
CARD_NAME = "README.md"
TRAIN_CONFIG_NAME = "train_config.json"


def validate_state_dict(state_dict: dict[str, torch.Tensor], peft_type: str) -> None:
    """Refuse tensors that are not a complete LoRA / LoKr adapter, naming the first bad key."""
    if not state_dict:
        raise StudioError("the adapter has no tensors; nothing to save")
    by_module: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state_dict.items():
        if not isinstance(tensor, torch.Tensor) or not tensor.is_floating_point():
            raise StudioError(f"tensor {key!r} is not a floating-point tensor")
        component, module, param = split_key(key)
        if (peft_type == "LORA") != param.startswith("lora_"):
            raise StudioError(f"tensor {key!r} does not belong in a {peft_type} adapter")
        by_module.setdefault(f"{component}.{module}", {})[param] = tensor
    for module, params in by_module.items():
        if peft_type == "LORA":
            if set(params) != {"lora_A.weight", "lora_B.weight"}:
                raise StudioError(f"module {module!r} needs both lora_A.weight and lora_B.weight")
            a, b = params["lora_A.weight"], params["lora_B.weight"]
            if a.shape[0] != b.shape[1]:
                raise StudioError(f"module {module!r}: lora_A rank {a.shape[0]} != lora_B rank {b.shape[1]}")
        else:
            has1 = "lokr_w1" in params or {"lokr_w1_a", "lokr_w1_b"} <= set(params)
            has2 = "lokr_w2" in params or {"lokr_w2_a", "lokr_w2_b"} <= set(params)
            if not (has1 and has2) or not set(params) <= set(LOKR_PARAMS):
                raise StudioError(f"module {module!r} has an incomplete set of LoKr factors: {sorted(params)}")


def build_config(meta: AdapterMeta, modules: list[str]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The adapter_config.json dict (PEFT's own) and the studio.json dict (with the per-component PEFT configs)."""
    components = component_configs(meta, modules)
    primary = components.get("unet") or next(iter(components.values()))
    return dict(primary), {**to_studio_dict(meta), "components": components}


def safetensors_metadata(meta: AdapterMeta, components: dict[str, dict[str, Any]]) -> dict[str, str]:
    packed = {f"{c}.{k}": v for c, cfg in components.items() for k, v in cfg.items() if k != "peft_type"}
    return {
        "format": "pt",
        "lora_adapter_metadata": json.dumps(packed, sort_keys=True),
        "studio.version": meta.version,
        "studio.peft_type": meta.peft_type,
        "studio.method": meta.method,
        "studio.kind": meta.kind,
        "studio.trigger_words": json.dumps(meta.trigger_words),
        "studio.base_family": meta.base.family,
        "studio.base_fingerprint": meta.base.fingerprint,
        "studio.base_checkpoint": meta.base.checkpoint,
    }


def save_adapter(
    folder: Path,
    state_dict: dict[str, torch.Tensor],
    meta: AdapterMeta,
    *,
    card: str | None = None,
    samples: dict[str, bytes] | None = None,
    train_config: dict[str, Any] | None = None,
) -> None:
    """Write an adapter folder. Each file is written atomically; `Library.add` stages the whole folder."""
    validate_state_dict(state_dict, meta.peft_type)
    folder = Path(folder)
    modules = modules_of(state_dict)
    missing = [m for m in modules if m not in meta.alphas or m not in meta.ranks]
    if missing:
        raise StudioError(f"AdapterMeta has no alpha/rank for module {missing[0]!r}; fill meta.alphas and meta.ranks")
    config, studio = build_config(meta, modules)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
    atomic.write_bytes(folder / WEIGHTS_NAME, save(tensors, metadata=safetensors_metadata(meta, studio["components"])))
    atomic.write_json(folder / STUDIO_NAME, studio)
    atomic.write_json(folder / CONFIG_NAME, config)
    if card is not None:
        atomic.write_text(folder / CARD_NAME, card)
    if train_config is not None:
        atomic.write_json(folder / TRAIN_CONFIG_NAME, train_config)
    for filename, data in (samples or {}).items():
        if "/" in filename or filename.startswith(".") or not filename.endswith(".png"):
            raise StudioError(f"sample file name {filename!r} must be a plain name ending in .png")
        atomic.write_bytes(folder / "samples" / filename, data)


def _read_config(folder: Path, name: str = CONFIG_NAME) -> dict[str, Any]:
    path = folder / name
    try:
        config = json.loads(path.read_text())
    except FileNotFoundError:
        raise StudioError(f"{path} is missing; this folder is not an adapter (re-import it or remove it)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise StudioError(f"{path} is damaged ({err}); re-import the adapter or remove it") from None
    if not isinstance(config, dict):
        raise StudioError(f"{path} is not a JSON object; re-import the adapter or remove it")
    return config


def tensor_keys(path: Path) -> list[str]:
    """The tensor names of a safetensors file (header only), or a StudioError naming a damaged file."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return list(f.keys())
    except FileNotFoundError:
        raise StudioError(f"{path} is missing; re-import the adapter or remove it") from None
    except Exception as err:  # safetensors raises its own error types for damaged headers
        raise StudioError(f"{path} is not a readable safetensors file ({err}); replace or remove it") from None


def load_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """All tensors and the `__metadata__` of a safetensors file; damaged files give a StudioError naming them."""
    path = Path(path)
    if path.suffix.lower() in (".ckpt", ".pt", ".pth", ".bin", ".pkl"):
        raise StudioError(f"{path} is a pickle file; only .safetensors is accepted (convert it with safetensors)")
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
    except FileNotFoundError:
        raise StudioError(f"{path} does not exist") from None
    except Exception as err:
        raise StudioError(f"{path} is not a readable safetensors file ({err}); replace it") from None


def read_meta(folder: Path) -> tuple[AdapterMeta, list[str]]:
    """The adapter's meta and module list, reading only the config and the safetensors header."""
    folder = Path(folder)
    if (folder / STUDIO_NAME).is_file():
        studio, source = _read_config(folder, STUDIO_NAME), folder / STUDIO_NAME
    else:  # written before studio.json: the fields inside adapter_config.json
        studio, source = _read_config(folder).get("studio"), folder / CONFIG_NAME
    if not isinstance(studio, dict) or not isinstance(studio.get("components"), dict):
        raise StudioError(
            f"{folder} has no {STUDIO_NAME} (nor a \"studio\" section in {CONFIG_NAME}); import the folder with "
            "`studio library import`"
        )
    keys = tensor_keys(folder / WEIGHTS_NAME)
    try:
        modules = modules_of(dict.fromkeys(keys))  # type: ignore[arg-type]
        return from_studio_dict(studio, studio["components"], modules), modules
    except (TypeError, ValueError, KeyError) as err:
        raise StudioError(f"{source} has invalid studio fields ({err}); fix or re-import it") from None


def read_adapter(folder: Path) -> tuple[dict[str, torch.Tensor], AdapterMeta]:
    meta, _ = read_meta(folder)
    tensors, _ = load_safetensors(Path(folder) / WEIGHTS_NAME)
    validate_state_dict(tensors, meta.peft_type)
    return tensors, meta


def copy_extras(src: Path, dst: Path) -> None:
    """Copy the card, training config and samples of one adapter folder to another."""
    for name in (CARD_NAME, TRAIN_CONFIG_NAME):
        if (src / name).is_file():
            atomic.write_bytes(dst / name, (src / name).read_bytes())
    if (src / "samples").is_dir():
        shutil.copytree(src / "samples", dst / "samples", dirs_exist_ok=True)


def png_bytes(image: Any) -> bytes:
    """PNG bytes of a PIL image (for `samples=`)."""
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()
