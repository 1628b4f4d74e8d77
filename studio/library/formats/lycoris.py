"""LyCORIS LoKr files (`lora_unet_<module>.lokr_w1`, `lokr_w1_a/b`, `lokr_w2`, `lokr_w2_a/b`, `lokr_t2`, `.alpha`).

Delta: `dW = kron(w1, w2) * scale` with w1 = w1_a @ w1_b and w2 = w2_a @ w2_b when decomposed. LyCORIS
(lycoris/modules/lokr.py, also ComfyUI's lokr loader) uses `scale = alpha / r` with r the rank of the decomposed
factor, and `scale = 1` when both factors are full matrices (alpha is then ignored). PEFT's LoKr layer
(peft/tuners/lokr/layer.py `get_delta_weight`) always applies `alpha / r`, and picks full or decomposed factors
from r, `decompose_both` and `decompose_factor`. The import chooses PEFT's r, alpha and options so PEFT rebuilds
exactly the file's factor layout and scale: full-full modules get `r = alpha = max factor dim` (scale exactly 1);
the file's own alpha is kept under `source.lycoris_alpha` so export reproduces it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from peft.tuners.lokr.layer import factorization

from studio import atomic
from studio.errors import StudioError
from studio.library.adapter import check_module, load_safetensors
from studio.library.formats.keys import from_kohya, to_kohya
from studio.library.formats.lokr_layout import factor_dims
from studio.library.formats.sd_scripts import (
    Imported,
    export_metadata,
    export_naming,
    file_target,
    group_stems,
    import_meta,
    known_stems,
    naming_info,
    scalar_alpha,
    serialize_with_hashes,
    stem_of,
    write_lora_file,
)
from studio.library.meta import LOKR_PARAMS, AdapterMeta, modules_of


def _choose_factor(dims: list[tuple[int, int, int, int | None]]) -> int:
    candidates = [-1, *sorted({x for a, c, b, d in dims for x in (a, c, b, d) if x})]
    for f in candidates:
        if all(
            factorization(a * b, f) == (a, b) and (d is None or factorization(c * d, f) == (c, d))
            for a, c, b, d in dims
        ):
            return f
    raise StudioError("the LoKr factor shapes do not follow one decompose_factor that PEFT can rebuild")


def read_lycoris(path: Path, *, pipe: Any = None, layers_per_block: int | None = None) -> Imported:
    path = Path(path)
    tensors, metadata = load_safetensors(path)
    groups = group_stems(tensors, path)
    info = naming_info(list(groups), metadata)
    lpb = int(pipe.unet.config.layers_per_block) if pipe is not None else (layers_per_block or 2)
    known = None
    if pipe is not None:
        known = known_stems(
            pipe, ldm=info["naming"] == "ldm", layers_per_block=lpb, sdxl_te=info["te_prefix"] == "te1"
        )
    state_dict: dict[str, torch.Tensor] = {}
    ranks, alphas, file_alphas, dims, alpha_dtypes = {}, {}, {}, [], set()
    decompose_both = any("lokr_w1_a" in p for p in groups.values())
    effective_conv = any("lokr_t2" in p for p in groups.values())
    for stem, p in groups.items():
        extra = set(p) - {*LOKR_PARAMS, "alpha"}
        if extra:
            raise StudioError(
                f"{path}: {stem}.{sorted(extra)[0]} is not a LoKr tensor; mixed adapter types are not supported"
            )
        try:
            check_module(stem, {k: v for k, v in p.items() if k != "alpha"}, "LOKR")
        except StudioError as err:
            raise StudioError(f"{path}: {err}") from None
        component, module = from_kohya(stem, layers_per_block=lpb, known=known)
        full = f"{component}.{module}"
        a, c, b, d, r1, r2 = factor_dims(p)
        dims.append((a, c, b, d))
        alpha = scalar_alpha(path, stem, p["alpha"]) if "alpha" in p else None
        if "alpha" in p:
            alpha_dtypes.add(str(p["alpha"].dtype).removeprefix("torch."))
        file_alphas[full] = alpha
        if r1 is None and r2 is None:  # both full: LyCORIS scale is 1
            r = max(a, b, c, d or 0)
            ranks[full], alphas[full] = r, float(r)
        else:
            r = int(r2 if r2 is not None else r1)
            ranks[full], alphas[full] = r, alpha if alpha is not None else float(r)
        use_w1 = not (decompose_both and r < max(a, c) / 2)
        use_w2 = not (r < max(b, d or 0) / 2) if d is not None else r2 is None
        if use_w1 != (r1 is None) or use_w2 != (r2 is None):
            raise StudioError(
                f"{path}: {stem} has a LoKr factor layout PEFT cannot rebuild (w1 full={r1 is None}, "
                f"w2 full={r2 is None}, r={r}); re-export it with default LyCORIS factors"
            )
        for key in LOKR_PARAMS:
            if key in p:
                state_dict[f"{full}.{key}"] = p[key]
    factor = _choose_factor(dims)
    source = {
        "format": "lycoris",
        "naming": info["naming"],
        "te_prefix": info["te_prefix"],
        "layers_per_block": lpb,
        "alpha_dtype": sorted(alpha_dtypes)[0] if len(alpha_dtypes) == 1 else "",
        "lycoris_alpha": file_alphas,
    }
    meta = import_meta(path, metadata, info["family"], source)
    meta.peft_type, meta.ranks, meta.alphas = "LOKR", ranks, alphas
    meta.lokr = {"decompose_both": decompose_both, "decompose_factor": factor, "use_effective_conv2d": effective_conv}
    meta.base.layers_per_block = lpb
    name = metadata.get("ss_output_name") or metadata.get("modelspec.title") or path.stem
    return Imported(name, state_dict, meta)


def write_lycoris(name: str, state_dict: dict[str, torch.Tensor], meta: AdapterMeta, out: Path) -> Path:
    """Write a LyCORIS file: LoKr factors for LoKr adapters, LoCon (kohya keys) for LoRA adapters."""
    if meta.peft_type == "LORA":
        return write_lora_file(name, state_dict, meta, out)
    modules = modules_of(state_dict)
    naming = export_naming(meta, modules)
    file_alphas = meta.source.get("lycoris_alpha") or {}
    dtype_name = meta.source.get("alpha_dtype") or ""
    tensors: dict[str, torch.Tensor] = {}
    for full in modules:
        stem = stem_of(full, naming)
        first = None
        for key in LOKR_PARAMS:
            if f"{full}.{key}" in state_dict:
                tensors[f"{stem}.{key}"] = state_dict[f"{full}.{key}"].contiguous()
                first = first if first is not None else state_dict[f"{full}.{key}"]
        alpha = file_alphas[full] if full in file_alphas else meta.alphas[full]
        if alpha is not None:
            dtype = getattr(torch, dtype_name) if dtype_name else first.dtype
            tensors[f"{stem}.alpha"] = torch.tensor(alpha, dtype=dtype)
    metadata = export_metadata(name, meta, modules, "lycoris.kohya")
    metadata.setdefault("ss_network_args", '{"algo": "lokr"}')
    out = file_target(Path(out), name)
    atomic.write_bytes(out, serialize_with_hashes(tensors, metadata))
    return out


__all__ = ["read_lycoris", "write_lycoris", "to_kohya"]
