"""GroupNorm with statistics per region: the specification in plain torch and its entry point (Triton on CUDA).

GroupNorm (Wu and He, ECCV 2018, Eq. 1-2) normalises each group of channels by one mean and standard deviation over
the group's channels and all positions. Regional composition (composers.region_norm) normalises each region by its
own statistics instead. With K normalisers, position weights `average` (L, K) (column k: normaliser k's weights
over the positions, summing to 1) and `share` (K, L) (each position's share of each normaliser), per sample b and
group g:

    mu_k     = sum_p average[p, k] mean_c x[c, p]            E_k[x^2] likewise with x^2         (1)
    sigma_k  = sqrt(E_k[x^2] - mu_k^2 + eps)                                                    (2)
    y[c, p]  = gamma_c sum_k share[k, p] (x[c, p] - mu_k) / sigma_k + beta_c                    (3)

With K = 1, average = 1/L and share = 1 this is GroupNorm. The reference below is 16 operator calls; the
Triton kernel (`lora_kernels.triton_group_norm`) is one launch that reads x twice and writes y once, as a GroupNorm
kernel does, which matters where a step is recorded as a CUDA graph of small kernels: regional composition runs
one per GroupNorm of the UNet (33 a step on studio-tiny, 61 on SD1.5).

Backend choice as `lora_kernels.dispatch`: `backend=` or `$STUDIO_KERNELS`, "auto" by default (Triton when x is on
CUDA, fp16/bf16/fp32, and no gradient is asked of it; the kernel has no backward), "triton" raises instead of
falling back.
"""

from __future__ import annotations

import functools
import logging
import math
import os

import torch

from lora_kernels.dispatch import BACKENDS, ENV_VAR, triton_module


logger = logging.getLogger(__name__)
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def region_group_norm_reference(x: torch.Tensor, num_groups: int, weight: torch.Tensor | None,
                                bias: torch.Tensor | None, eps: float, average: torch.Tensor,
                                share: torch.Tensor) -> torch.Tensor:
    """(3) for x (B, C, *spatial) with L spatial positions, in x's dtype; `average` (L, K), `share` (K, L)."""
    b, c = x.shape[:2]
    xg = x.reshape(b, num_groups, c // num_groups, -1)  # (B, g, C / g, L)
    average, share = average.to(x), share.to(x)
    # (1): a mean over a group's channels and the weighted positions = the weighted average of the channel means
    mean, ex2 = torch.stack([xg.mean(2), (xg * xg).mean(2)]) @ average  # (B, g, K) each
    inv = ((ex2 - mean * mean).clamp_min(0) + eps).rsqrt()  # (B, g, K): 1 / sigma_k, (2)
    scale, shift = torch.stack([inv, -mean * inv]) @ share  # (B, g, L): sum_k share_k / sigma_k, -mu_k / sigma_k
    y = torch.addcmul(shift[:, :, None], xg, scale[:, :, None]).reshape(x.shape)
    view = (1, c) + (1,) * (x.ndim - 2)  # gamma_c, beta_c
    if weight is not None and bias is not None:
        return torch.addcmul(bias.reshape(view), y, weight.reshape(view))
    if weight is not None:
        return y * weight.reshape(view)
    return y if bias is None else y + bias.reshape(view)


def _why_not_triton(x: torch.Tensor, operands: list[torch.Tensor | None]) -> str | None:
    module, reason = triton_module("triton_group_norm")
    if module is None:
        return reason
    if x.device.type != "cuda" and not module.interpreting():
        return f"x is on {x.device.type}, the Triton kernel needs a CUDA device (or TRITON_INTERPRET=1)"
    if x.dtype not in _DTYPES:
        return f"x is {x.dtype}; the Triton kernel takes {', '.join(map(str, _DTYPES))}"
    tensors = [x, *[t for t in operands if t is not None]]
    if any(t.device != x.device for t in tensors):
        return f"operands are on several devices {sorted({str(t.device) for t in tensors})}"
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return "a gradient is asked of it and the Triton kernel has no backward"
    return None


@functools.cache
def _log_once(reason: str) -> None:
    logger.info("region GroupNorm: using the torch reference (%s)", reason)


def region_group_norm(x: torch.Tensor, num_groups: int, weight: torch.Tensor | None, bias: torch.Tensor | None,
                      eps: float, average: torch.Tensor, share: torch.Tensor, *,
                      backend: str | None = None) -> torch.Tensor:
    """(3) on the chosen backend (module docstring): x (B, C, *spatial), `average` (L, K), `share` (K, L)."""
    name = (backend or os.environ.get(ENV_VAR) or "auto").lower()
    if name not in BACKENDS:
        raise ValueError(f"unknown kernel backend {name!r} (from backend= or ${ENV_VAR}); use one of {BACKENDS}")
    c, length = x.shape[1], math.prod(x.shape[2:])
    if c % num_groups:
        raise ValueError(f"x has {c} channels, which {num_groups} groups do not divide; pass the GroupNorm's own "
                         "num_groups")
    if average.shape != (length, share.shape[0]) or share.shape[1] != length:
        raise ValueError(f"x {tuple(x.shape)} does not fit average {tuple(average.shape)} and "
                         f"share {tuple(share.shape)}; they must be (L, K) and (K, L) with L = {length}")
    reason = None if name == "reference" else _why_not_triton(x, [weight, bias, average, share])
    if name == "reference" or reason is not None:
        if name == "triton":
            raise RuntimeError(f"backend 'triton' cannot run this call: {reason}; use backend='auto' to fall back")
        if reason is not None:
            _log_once(reason)
        return region_group_norm_reference(x, num_groups, weight, bias, eps, average, share)
    return triton_module("triton_group_norm")[0].region_group_norm(x, num_groups, weight, bias, eps, average, share)
