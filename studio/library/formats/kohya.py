"""kohya / A1111 LoRA files (`lora_unet_..._lora_down.weight`, `.lora_up.weight`, `.alpha`) in and out.

Covers attention, feed-forward, proj_in/out, convolutions (LoCon: k x k down, 1 x 1 up), ResNet time projections,
`lora_te_` (SD1/SD2) and `lora_te1_`/`lora_te2_` (SDXL) text encoders; SD1.x diffusers-style UNet names and SDXL
`input_blocks` names. `ss_*`, `modelspec.*` and `sshs_*` metadata are kept on import and written on export, with
`sshs_model_hash` / `sshs_legacy_hash` recomputed as sd-scripts does (sd_scripts.py; sd-scripts library/train_util.py).
Import -> export reproduces every tensor bit for bit, `.alpha` (value and dtype) included.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from studio.errors import StudioError
from studio.library.adapter import check_module, load_safetensors
from studio.library.formats.keys import from_kohya, to_kohya
from studio.library.formats.sd_scripts import (
    Imported,
    group_stems,
    import_meta,
    known_stems,
    naming_info,
    scalar_alpha,
    write_lora_file,
)
from studio.library.meta import AdapterMeta, modules_of


def read_kohya(path: Path, *, pipe: Any = None, layers_per_block: int | None = None) -> Imported:
    """Read a kohya LoRA file. With `pipe` the module names are matched exactly against that base."""
    path = Path(path)
    tensors, metadata = load_safetensors(path)
    groups = group_stems(tensors, path)
    if any(k.startswith("lokr_") for g in groups.values() for k in g):
        raise StudioError(f"{path} is a LyCORIS LoKr file; import it with --format lycoris (or auto)")
    info = naming_info(list(groups), metadata)
    if pipe is not None:
        layers_per_block = int(pipe.unet.config.layers_per_block)
    lpb = layers_per_block or 2
    known = None
    if pipe is not None:
        known = known_stems(
            pipe, ldm=info["naming"] == "ldm", layers_per_block=lpb, sdxl_te=info["te_prefix"] == "te1"
        )
    state_dict, alphas, alpha_dtypes, has_alpha = {}, {}, set(), []
    for stem, params in groups.items():
        extra = set(params) - {"lora_down.weight", "lora_up.weight", "alpha"}
        if extra:
            what = sorted(extra)[0]
            raise StudioError(f"{path}: {stem}.{what} is not a plain LoRA tensor (DoRA/LoHa/OFT are not supported)")
        if "lora_down.weight" not in params or "lora_up.weight" not in params:
            raise StudioError(f"{path}: {stem} lacks lora_down.weight or lora_up.weight; the file is incomplete")
        try:
            pair = {"lora_A.weight": params["lora_down.weight"], "lora_B.weight": params["lora_up.weight"]}
            check_module(stem, pair, "LORA")
        except StudioError as err:
            raise StudioError(f"{path}: {err}") from None
        component, module = from_kohya(stem, layers_per_block=lpb, known=known)
        if (
            to_kohya(
                component,
                module,
                ldm=info["naming"] == "ldm",
                layers_per_block=lpb,
                sdxl_te=info["te_prefix"] == "te1",
            )
            != stem
        ):
            raise StudioError(f"{path}: cannot map kohya module {stem!r} to a diffusers module; pass the base model")
        full = f"{component}.{module}"
        state_dict[f"{full}.lora_A.weight"] = params["lora_down.weight"]
        state_dict[f"{full}.lora_B.weight"] = params["lora_up.weight"]
        if "alpha" in params:
            alphas[full] = scalar_alpha(path, stem, params["alpha"])
            alpha_dtypes.add(str(params["alpha"].dtype).removeprefix("torch."))
            has_alpha.append(full)
    source = {
        "format": "kohya",
        "naming": info["naming"],
        "te_prefix": info["te_prefix"],
        "layers_per_block": lpb,
        "alpha_dtype": sorted(alpha_dtypes)[0] if len(alpha_dtypes) == 1 else "",
        "has_alpha": len(has_alpha) == len(groups),
    }
    meta = import_meta(path, metadata, info["family"], source)
    meta.ranks = {m: int(state_dict[f"{m}.lora_A.weight"].shape[0]) for m in modules_of(state_dict)}
    meta.alphas = {m: alphas.get(m, float(r)) for m, r in meta.ranks.items()}
    meta.base.layers_per_block = lpb
    name = metadata.get("ss_output_name") or metadata.get("modelspec.title") or path.stem
    return Imported(name, state_dict, meta)


def write_kohya(name: str, state_dict: dict[str, torch.Tensor], meta: AdapterMeta, out: Path) -> Path:
    """Write a kohya LoRA `.safetensors` file (LoRA adapters only; LoKr exports with the lycoris format)."""
    if meta.peft_type != "LORA":
        raise StudioError(f"{name!r} is a {meta.peft_type} adapter; export it with --format lycoris")
    return write_lora_file(name, state_dict, meta, out)
