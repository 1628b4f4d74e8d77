"""GroupNorm with statistics per region (`lora_kernels.group_norm`, Eq. 1-3) as one Triton kernel.

One program per (sample, group) makes two passes over the group's (C / g, L) block of x, in tiles of positions:

1. per position the channel mean of x and of x^2, accumulated into the K normalisers' weighted sums
   (`average` (L, K)): mu_k and E_k[x^2] (Eq. 1), then 1 / sigma_k (Eq. 2), all in fp32;
2. per position scale = sum_k share[k, p] / sigma_k and shift = -sum_k share[k, p] mu_k / sigma_k, and
   y = (x scale + shift) gamma_c + beta_c written once (Eq. 3).

So x is read twice and y written once, as a GroupNorm kernel does, in one launch instead of the reference's 16.
Inputs fp16, bf16 or fp32; output in x's dtype, contiguous. No backward (the dispatcher falls back to the reference
when a gradient is asked). Runs under TRITON_INTERPRET=1 on CPU tensors, as `lora_kernels.triton_lora`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lora_kernels.triton_lora import interpreting


__all__ = ["interpreting", "region_group_norm"]


@triton.jit
def _region_norm_kernel(
    x_ptr, w_ptr, b_ptr, avg_ptr, share_ptr, y_ptr,
    L, K, CPG, eps,
    stride_xb, stride_xc, stride_xl, stride_al, stride_ak, stride_sk, stride_sl, stride_yb, stride_yc, stride_yl,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """Eq. 1-3 for sample program_id(0), channel group program_id(1): channels [g CPG, (g + 1) CPG)."""
    sample, group = tl.program_id(0), tl.program_id(1)
    rc = tl.arange(0, BLOCK_C)  # (BC,) channel within the group
    c_ok = rc < CPG
    channel = group * CPG + rc  # (BC,)
    rk = tl.arange(0, BLOCK_K)  # (BK,) normaliser
    k_ok = rk < K
    rl = tl.arange(0, BLOCK_L)  # (BL,) position within a tile
    x_rows = x_ptr + sample.to(tl.int64) * stride_xb + channel.to(tl.int64)[:, None] * stride_xc  # (BC, 1)
    y_rows = y_ptr + sample.to(tl.int64) * stride_yb + channel.to(tl.int64)[:, None] * stride_yc  # (BC, 1)
    mean = tl.zeros((BLOCK_K,), dtype=tl.float32)  # (BK,) mu_k
    ex2 = tl.zeros((BLOCK_K,), dtype=tl.float32)  # (BK,) E_k[x^2]
    for l0 in range(0, L, BLOCK_L):  # pass 1: Eq. 1
        pos = l0 + rl
        l_ok = pos < L
        x = tl.load(x_rows + pos[None, :] * stride_xl, mask=c_ok[:, None] & l_ok[None, :], other=0.0).to(tl.float32)
        m1 = tl.sum(x, axis=0) / CPG  # (BL,) channel mean at each position
        m2 = tl.sum(x * x, axis=0) / CPG  # (BL,)
        avg = tl.load(avg_ptr + pos[:, None] * stride_al + rk[None, :] * stride_ak,
                      mask=l_ok[:, None] & k_ok[None, :], other=0.0).to(tl.float32)  # (BL, BK)  # fmt: skip
        mean += tl.sum(m1[:, None] * avg, axis=0)
        ex2 += tl.sum(m2[:, None] * avg, axis=0)
    inv = tl.rsqrt(tl.maximum(ex2 - mean * mean, 0.0) + eps)  # (BK,) 1 / sigma_k, Eq. 2
    neg = -mean * inv  # (BK,)
    if HAS_WEIGHT:
        gamma = tl.load(w_ptr + channel, mask=c_ok, other=0.0).to(tl.float32)[:, None]  # (BC, 1)
    if HAS_BIAS:
        beta = tl.load(b_ptr + channel, mask=c_ok, other=0.0).to(tl.float32)[:, None]  # (BC, 1)
    for l0 in range(0, L, BLOCK_L):  # pass 2: Eq. 3
        pos = l0 + rl
        l_ok = pos < L
        share = tl.load(share_ptr + rk[:, None] * stride_sk + pos[None, :] * stride_sl,
                        mask=k_ok[:, None] & l_ok[None, :], other=0.0).to(tl.float32)  # (BK, BL)  # fmt: skip
        scale = tl.sum(inv[:, None] * share, axis=0)  # (BL,)
        shift = tl.sum(neg[:, None] * share, axis=0)  # (BL,)
        cl_ok = c_ok[:, None] & l_ok[None, :]
        x = tl.load(x_rows + pos[None, :] * stride_xl, mask=cl_ok, other=0.0).to(tl.float32)  # (BC, BL)
        y = x * scale[None, :] + shift[None, :]
        if HAS_WEIGHT:
            y = y * gamma
        if HAS_BIAS:
            y = y + beta
        tl.store(y_rows + pos[None, :] * stride_yl, y.to(y_ptr.dtype.element_ty), mask=cl_ok)


def region_group_norm(x: torch.Tensor, num_groups: int, weight: torch.Tensor | None, bias: torch.Tensor | None,
                      eps: float, average: torch.Tensor, share: torch.Tensor) -> torch.Tensor:
    """`lora_kernels.group_norm.region_group_norm_reference` in one launch: x (B, C, *spatial), `average` (L, K),
    `share` (K, L)."""
    b, c = x.shape[:2]
    x3 = x.reshape(b, c, -1)  # (B, C, L): a view of a contiguous or channels-last map
    length, k = x3.shape[2], average.shape[1]
    y3 = torch.empty((b, c, length), dtype=x.dtype, device=x.device)  # (B, C, L)
    cpg = c // num_groups
    block_c = triton.next_power_of_2(cpg)
    block_l = max(16, min(triton.next_power_of_2(length), 4096 // block_c))  # a (BC, BL) tile of at most 4096
    _region_norm_kernel[(b, num_groups)](
        x3, weight if weight is not None else x3, bias if bias is not None else x3, average, share, y3,
        length, k, cpg, float(eps),
        *x3.stride(), *average.stride(), *share.stride(), *y3.stride(),
        HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None,
        BLOCK_C=block_c, BLOCK_L=block_l, BLOCK_K=max(2, triton.next_power_of_2(k)),
    )  # fmt: skip
    return y3.view(x.shape)
