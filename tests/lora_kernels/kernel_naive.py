"""Test helpers: random adapters and the per-adapter loop the fused op must equal (written independently of it)."""

from __future__ import annotations

import torch


Factors = list[tuple[torch.Tensor, torch.Tensor] | None]


def rand(g: torch.Generator, *shape: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)


def adapters(g: torch.Generator, d_out: int, d_in: int, ranks: list[int]) -> Factors:
    """Random, non-identity factors (A (r, d_in), B (d_out, r)) per adapter; rank 0 means absent (None)."""
    return [None if r == 0 else (rand(g, r, d_in), rand(g, d_out, r)) for r in ranks]


def naive(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    factors: Factors,
    s: torch.Tensor,
) -> torch.Tensor:
    """y = x W^T + b + sum_k S[..., k] (x A_k^T) B_k^T, one adapter at a time; x (..., d_in), s (..., K) full size."""
    y = x @ weight.T
    if bias is not None:
        y = y + bias
    for k, factor in enumerate(factors):
        if factor is not None:
            a, b = factor
            y = y + s[..., k : k + 1] * ((x @ a.T) @ b.T)
    return y


def merged(
    weight: torch.Tensor, factors: list[tuple[torch.Tensor, torch.Tensor] | None], s: list[float]
) -> torch.Tensor:
    """W + sum_k s_k B_k A_k."""
    out = weight.clone()
    for k, factor in enumerate(factors):
        if factor is not None:
            out = out + s[k] * factor[1] @ factor[0]
    return out
