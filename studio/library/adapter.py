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
import math
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

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


if TYPE_CHECKING:
    import torch

CONFIG_NAME = "adapter_config.json"
STUDIO_NAME = "studio.json"
WEIGHTS_NAME = "adapter_model.safetensors"
CARD_NAME = "README.md"
TRAIN_CONFIG_NAME = "train_config.json"


def _dims(module: str, name: str, t: torch.Tensor, allowed: tuple[int, ...]) -> None:
    if t.dim() not in allowed:
        dims = " or ".join(map(str, allowed))
        raise StudioError(f"module {module!r}: {name} has shape {list(t.shape)}, not {dims}-D")


def check_module(module: str, params: dict[str, torch.Tensor], peft_type: str) -> None:
    """Refuse one module's tensors unless they are a whole LoRA pair or LoKr factor set whose shapes fit together,
    floating-point, non-empty and finite; the message names the module and what is wrong.

    LoRA: A (r, in) and B (out, r), or A (r, in, kh, kw) and B (out, r, 1, 1) for a convolution. LoKr: w1 (a, c) or
    w1_a (a, r) @ w1_b (r, c); w2 (b, d[, kh, kw]), w2_a (b, r) @ w2_b (r, d...), or the CP form t2 (r, r, kh, kw)
    with w2_a (r, b) and w2_b (r, d) (PEFT's `make_weight_cp`).
    """
    import torch

    for name, t in params.items():
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise StudioError(f"module {module!r}: {name} is not a floating-point tensor")
        if t.numel() == 0:
            raise StudioError(f"module {module!r}: {name} is empty (shape {list(t.shape)})")
        if not torch.isfinite(t).all():
            raise StudioError(f"module {module!r}: {name} holds NaN or infinite values; the adapter is damaged")
    if peft_type == "LORA":
        if set(params) != {"lora_A.weight", "lora_B.weight"}:
            raise StudioError(f"module {module!r} needs both lora_A.weight and lora_B.weight")
        a, b = params["lora_A.weight"], params["lora_B.weight"]
        _dims(module, "lora_A", a, (2, 4))
        _dims(module, "lora_B", b, (a.dim(),))
        if a.shape[0] != b.shape[1] or b.shape[2:] not in ((), (1, 1)):
            raise StudioError(f"module {module!r}: lora_A {list(a.shape)} and lora_B {list(b.shape)} do not fit "
                              "(A is (r, in...), B is (out, r[, 1, 1]))")
        return
    has1 = "lokr_w1" in params or {"lokr_w1_a", "lokr_w1_b"} <= set(params)
    has2 = "lokr_w2" in params or {"lokr_w2_a", "lokr_w2_b"} <= set(params)
    if not (has1 and has2) or not set(params) <= set(LOKR_PARAMS):
        raise StudioError(f"module {module!r} has an incomplete set of LoKr factors: {sorted(params)}")
    for name, t in params.items():
        _dims(module, name, t, (2, 4) if name in ("lokr_w2", "lokr_t2") else (2,))
    pairs = [("lokr_w1_a", 1, "lokr_w1_b", 0)]
    if "lokr_t2" in params:
        t2 = params["lokr_t2"]
        _dims(module, "lokr_t2", t2, (4,))
        pairs += [("lokr_t2", 0, "lokr_w2_a", 0), ("lokr_t2", 1, "lokr_w2_b", 0)]
    else:
        pairs.append(("lokr_w2_a", 1, "lokr_w2_b", 0))
    for first, i, second, j in pairs:
        if first in params and second in params and params[first].shape[i] != params[second].shape[j]:
            raise StudioError(f"module {module!r}: {first} {list(params[first].shape)} and {second} "
                              f"{list(params[second].shape)} do not fit")


def validate_state_dict(state_dict: dict[str, torch.Tensor], peft_type: str) -> None:
    """Refuse tensors that are not a complete LoRA / LoKr adapter (see `check_module`), naming the first bad key."""
    if not state_dict:
        raise StudioError("the adapter has no tensors; nothing to save")
    if peft_type == "SPARSE":
        from studio.library.sparse import validate

        return validate(state_dict)
    by_module: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state_dict.items():
        component, module, param = split_key(key)
        if (peft_type == "LORA") != param.startswith("lora_"):
            raise StudioError(f"tensor {key!r} does not belong in a {peft_type} adapter")
        by_module.setdefault(f"{component}.{module}", {})[param] = tensor
    for module, params in by_module.items():
        check_module(module, params, peft_type)


def validate_meta(state_dict: dict[str, torch.Tensor], meta: AdapterMeta) -> None:
    """Refuse ranks and alphas that disagree with the tensors: every module has a positive whole rank, equal to the
    tensors' inner size where the tensors have one (LoRA's A rows, LoKr's decomposed factors), and a finite alpha.
    A declared rank is what PEFT allocates when the adapter loads, so a wrong one must never reach the library.
    A sparse delta has no ranks: its indices must lie inside the parameter shapes the meta declares."""
    if meta.peft_type == "SPARSE":
        from studio.library.sparse import validate

        return validate(state_dict, meta.sparse.get("shapes", {}))
    for module in modules_of(state_dict):
        r, alpha = meta.ranks.get(module), meta.alphas.get(module)
        if r is None or alpha is None:
            raise StudioError(f"AdapterMeta has no alpha/rank for module {module!r}; fill meta.alphas and meta.ranks")
        if isinstance(r, bool) or not isinstance(r, int) or r < 1:
            raise StudioError(f"module {module!r}: rank {r!r} is not a positive whole number")
        if not isinstance(alpha, int | float) or not math.isfinite(alpha):
            raise StudioError(f"module {module!r}: alpha {alpha!r} is not a finite number")
        inner = [state_dict[f"{module}.{k}"].shape[0] for k in ("lora_A.weight", "lokr_w1_b", "lokr_w2_b")
                 if f"{module}.{k}" in state_dict]
        if any(n != r for n in inner):
            raise StudioError(f"module {module!r}: the config says rank {r} but the tensors have rank {inner[0]}")


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
    validate_meta(state_dict, meta)
    folder = Path(folder)
    modules = modules_of(state_dict)
    from safetensors.torch import save

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
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="numpy") as f:  # the header alone: no torch to import for a listing
            return list(f.keys())
    except FileNotFoundError:
        raise StudioError(f"{path} is missing; re-import the adapter or remove it") from None
    except Exception as err:  # safetensors raises its own error types for damaged headers
        raise StudioError(f"{path} is not a readable safetensors file ({err}); replace or remove it") from None


def load_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """All tensors and the `__metadata__` of a safetensors file; damaged files give a StudioError naming them."""
    from safetensors import safe_open

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
    try:
        validate_state_dict(tensors, meta.peft_type)
        validate_meta(tensors, meta)
    except StudioError as err:
        raise StudioError(f"{folder}: {err}; re-import the adapter or remove it") from None
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
