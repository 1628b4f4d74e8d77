"""Fused multi-adapter projections: `y = x W^T + b + sum_k S[t, k] (x A_k^T) B_k^T`, q/k/v at once.

`reference` is the specification in plain torch, `triton_lora` the same functions in Triton (CUDA), `dispatch`
picks one per call (`STUDIO_KERNELS=reference|triton|auto`) and holds the diffusers attention processor, and
`python -m lora_kernels.bench` times both against merged weights and per-adapter PEFT layers. DESIGN.md section 7.
`group_norm` (with `triton_group_norm`) is GroupNorm with statistics per region, for regional composition.
`frame` is diffusers' attention-processor frame around an `attend` method, which the project's processors share.

This package imports nothing of the project: only torch, the standard library and (lazily) triton.

The package is `lora_kernels`, not `kernels` as DESIGN.md first named it: transformers 5 requires Hugging Face's
`kernels` distribution, a top-level package of that name, and `transformers.modeling_utils` imports from it, so a
`kernels/` of ours first on `sys.path` broke every import of transformers (and of peft and the diffusers UNet).
"""

from __future__ import annotations

from lora_kernels.dispatch import (
    AdapterFactors,
    FusedLoRAAttnProcessor,
    choose_backend,
    fused_qkv,
    lora_linear,
    projections,
    region_scales,
)
from lora_kernels.group_norm import region_group_norm
from lora_kernels.reference import PackedProjections, column_scales, pack, token_scales


__all__ = [
    "AdapterFactors",
    "FusedLoRAAttnProcessor",
    "PackedProjections",
    "choose_backend",
    "column_scales",
    "fused_qkv",
    "lora_linear",
    "pack",
    "projections",
    "region_group_norm",
    "region_scales",
    "token_scales",
]
