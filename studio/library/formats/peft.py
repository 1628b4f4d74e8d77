"""PEFT adapter folders: `adapter_config.json` + `adapter_model.safetensors` (`base_model.model.<module>...`).

One PEFT folder describes one model. Export writes one subfolder per component (`unet/`, `text_encoder/`,
`text_encoder_2/`), each loadable with `PeftModel.from_pretrained(component, folder / component)`. Import accepts
that layout, a single folder (its component guessed from the module names), or a studio library folder.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save

from studio import atomic
from studio.configs import finite
from studio.errors import StudioError
from studio.library.adapter import load_safetensors, validate_state_dict
from studio.library.formats.lokr_layout import layout_problem
from studio.library.formats.sd_scripts import Imported
from studio.library.meta import (
    COMPONENTS,
    AdapterMeta,
    canonical_key,
    component_configs,
    modules_of,
    peft_key,
    ranks_alphas_from_configs,
)


_LOKR_CONFIG_KEYS = ("decompose_both", "decompose_factor", "use_effective_conv2d")


def _guess_component(modules: list[str]) -> str:
    if any(m.startswith(("down_blocks", "up_blocks", "mid_block", "conv_in")) for m in modules):
        return "unet"
    if any(m.startswith(("encoder.layers", "text_model.")) for m in modules):
        return "text_encoder"
    raise StudioError("cannot tell which model this PEFT folder adapts; put it in a unet/ or text_encoder/ subfolder")


def _read_one(folder: Path, component: str | None) -> tuple[str, dict[str, torch.Tensor], dict[str, Any]]:
    try:
        config = json.loads((folder / "adapter_config.json").read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise StudioError(f"{folder / 'adapter_config.json'} is missing or damaged ({err})") from None
    if not isinstance(config, dict):
        raise StudioError(f"{folder / 'adapter_config.json'} is not a JSON object; re-export the adapter")
    tensors, _ = load_safetensors(folder / "adapter_model.safetensors")
    sub = {}
    for key, tensor in tensors.items():
        key = canonical_key(key.removeprefix("base_model.model."))
        if not key.endswith((".lora_A.weight", ".lora_B.weight")) and ".lokr_" not in key:
            raise StudioError(f"{folder}: tensor {key!r} is not a LoRA/LoKr tensor (only those are supported)")
        sub[key] = tensor
    if component is None:
        component = _guess_component([k.rsplit(".lo", 1)[0] for k in sub])
    return component, {f"{component}.{k}": v for k, v in sub.items()}, config


def _check_lokr(folder: Path, state_dict: dict[str, torch.Tensor], ranks: dict[str, int], lokr: dict) -> None:
    """Refuse LoKr factors PEFT would not rebuild from the config (it would fail when the adapter loads)."""
    factor = finite(lokr.get("decompose_factor", -1), "decompose_factor", int)
    both = lokr.get("decompose_both", False)
    if not isinstance(both, bool):
        raise StudioError(f"{folder}: decompose_both must be true or false, got {both!r}")
    lokr["decompose_factor"] = factor
    for module in modules_of(state_dict):
        params = {k.rsplit(".", 1)[1]: v for k, v in state_dict.items() if k.rsplit(".", 1)[0] == module}
        problem = layout_problem(params, ranks[module], both, factor)
        if problem:
            raise StudioError(f"{folder}: module {module}: {problem}; re-export the adapter with its own config")


def read_peft(folder: Path) -> Imported:
    folder = Path(folder)
    parts = [(c, folder / c) for c in COMPONENTS if (folder / c / "adapter_config.json").is_file()]
    if not parts:
        parts = [(None, folder)]
    state_dict: dict[str, torch.Tensor] = {}
    configs: dict[str, dict[str, Any]] = {}
    for component, sub in parts:
        component, tensors, config = _read_one(sub, component)
        state_dict |= tensors
        configs[component] = config
    peft_types = {str(c.get("peft_type", "LORA")).upper() for c in configs.values()}
    if len(peft_types) != 1 or not peft_types <= {"LORA", "LOKR"}:
        raise StudioError(f"{folder}: PEFT type {sorted(peft_types)} is not supported; LORA and LOKR are")
    peft_type = peft_types.pop()
    try:
        validate_state_dict(state_dict, peft_type)
        ranks, alphas = ranks_alphas_from_configs(configs, modules_of(state_dict))
    except StudioError as err:
        raise StudioError(f"{folder}: {err}") from None
    first = next(iter(configs.values()))
    lokr = {k: first[k] for k in _LOKR_CONFIG_KEYS if k in first} if peft_type == "LOKR" else {}
    if peft_type == "LOKR":
        _check_lokr(folder, state_dict, ranks, lokr)
    meta = AdapterMeta(
        peft_type=peft_type,
        method="imported",
        ranks=ranks,
        alphas=alphas,
        lokr=lokr,
        source={"format": "peft", "file": folder.name},
    )
    return Imported(folder.name, state_dict, meta)


def write_peft(name: str, state_dict: dict[str, torch.Tensor], meta: AdapterMeta, out: Path) -> Path:
    """Write one PEFT folder per component under `out`. Every component is staged first and then renamed into place,
    so a failed export (a full disk) leaves what `out` held before."""
    from studio.library.meta import peft_config

    out = Path(out)
    if out.exists() and not out.is_dir():
        raise StudioError(f"--out {out} must be a folder for the peft format")
    out.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=".export-", dir=out))
    try:
        components = component_configs(meta, modules_of(state_dict))
        for component, config in components.items():
            prefix = f"{component}."
            tensors = {
                f"base_model.model.{peft_key(k[len(prefix) :])}": v.contiguous()
                for k, v in state_dict.items()
                if k.startswith(prefix)
            }
            config_dict = peft_config(config).to_dict()
            for key, value in config_dict.items():
                if isinstance(value, set):
                    config_dict[key] = sorted(value)
            blob = save(tensors, metadata={"format": "pt"})
            atomic.write_bytes(stage / component / "adapter_model.safetensors", blob)
            atomic.write_json(stage / component / "adapter_config.json", config_dict)
        for component in components:  # renames only: no space needed
            target = out / component
            if target.exists():
                trash = stage / f".old-{component}"
                os.rename(target, trash)
            os.rename(stage / component, target)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return out
