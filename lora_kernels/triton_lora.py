"""The fused adapter projection in Triton: same functions and signatures as `lora_kernels.reference`.

Two launches per call (shapes as in the reference's module docstring, G = P K scale groups):

1. shrink: h = (x A_cat^T) * S_col, (T, R) in fp32. All adapters of all packed projections in one pass over x;
   the scale is gathered per token and rank column from S (T, G) through the column's group index, so S_col is
   never materialised.
2. base GEMM with the expand in its epilogue: one tile loop accumulates x W^T over d_in, then h B_cat^T over the
   rank columns of the projections the tile's output columns belong to (B is block-diagonal over packed
   projections, so a q tile skips the k and v ranks), adds the bias and writes y once. This is Nunchaku's "fuse
   [Up Projection + 4-Bit Compute]" (arXiv 2411.05007, section 4.4) without quantisation, and vLLM's packed-slice
   expand (vllm/lora/ops/triton_ops/lora_expand_op.py) moved into the base GEMM instead of a second pass over y.

Inputs fp16, bf16 or fp32 (all the same dtype), accumulation in fp32. fp32 dots are IEEE unless
`torch.backends.cuda.matmul.allow_tf32` is set, as torch's own matmul. Block sizes are autotuned per shape.

Backward (training) is plain torch in an autograd.Function: dx = dy W + ((dy B) * S_col) A, dW = dy^T x,
dA = ((dy B) * S_col)^T x, dB = dy^T h, dS = per-group sums of (dy B) * (x A^T). Every term is a dense GEMM that
cuBLAS already runs at the roofline; the fusion pays in the forward, where it removes the rank-sized round trips
of PEFT's per-adapter path at inference, and a fused backward would save only one read of dy.

Under TRITON_INTERPRET=1 the same kernels run on CPU tensors, with one fixed block configuration; 16-bit dot
operands are upcast there because the interpreter multiplies bf16 as raw uint16 bits (triton 3.8).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from lora_kernels.reference import Factor, PackedProjections, group_index, pack, token_scales


@triton.jit
def _shrink_kernel(
    x_ptr, a_ptr, s_ptr, g_ptr, h_ptr,
    T, D, R,
    stride_xt, stride_xd, stride_ar, stride_ad, stride_st, stride_sg, stride_ht, stride_hr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """h[t, j] = S[t, group[j]] * sum_d x[t, d] A[j, d] for one (BLOCK_T, BLOCK_R) tile of h (T, R)."""
    rt = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)  # (BT,) token rows
    rr = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)  # (BR,) rank columns
    rd = tl.arange(0, BLOCK_D)
    t_ok, r_ok = rt < T, rr < R
    x_rows = x_ptr + rt.to(tl.int64)[:, None] * stride_xt  # (BT, 1)
    a_rows = a_ptr + rr[:, None] * stride_ar  # (BR, 1)
    acc = tl.zeros((BLOCK_T, BLOCK_R), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        d_ok = d0 + rd < D
        x = tl.load(x_rows + (d0 + rd)[None, :] * stride_xd, mask=t_ok[:, None] & d_ok[None, :], other=0.0)  # (BT, BD)
        a = tl.load(a_rows + (d0 + rd)[None, :] * stride_ad, mask=r_ok[:, None] & d_ok[None, :], other=0.0)  # (BR, BD)
        if UPCAST:
            x, a = x.to(tl.float32), a.to(tl.float32)
        acc = tl.dot(x, tl.trans(a), acc, input_precision=PRECISION)  # (BT, BR)
    group = tl.load(g_ptr + rr, mask=r_ok, other=0)  # (BR,) scale group (projection, adapter) of each column
    tr_ok = t_ok[:, None] & r_ok[None, :]
    s = tl.load(s_ptr + rt.to(tl.int64)[:, None] * stride_st + group[None, :] * stride_sg, mask=tr_ok, other=0.0)
    h_ptrs = h_ptr + rt.to(tl.int64)[:, None] * stride_ht + rr[None, :] * stride_hr
    tl.store(h_ptrs, acc * s.to(tl.float32), mask=tr_ok)  # (BT, BR)


@triton.jit
def _fused_kernel(
    x_ptr, w_ptr, bias_ptr, h_ptr, b_ptr, y_ptr,
    T, N, D, R, N1, N2, R1, R2,
    stride_xt, stride_xd, stride_wn, stride_wd, stride_ht, stride_hr, stride_bn, stride_br, stride_yt, stride_yn,
    HAS_BIAS: tl.constexpr, HAS_LORA: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr,
    GROUP_T: tl.constexpr,
):  # fmt: skip
    """y = x W^T + h B^T + b for one (BLOCK_T, BLOCK_N) tile of y (T, N), written once.

    Packed projections: output columns [0, N1) use rank columns [0, R1), [N1, N2) use [R1, R2), [N2, N) use [R2, R).
    """
    # Grouped launch order: GROUP_T consecutive row blocks walk the column blocks together, so W tiles stay in L2.
    pid = tl.program_id(0)
    blocks_t, blocks_n = tl.cdiv(T, BLOCK_T), tl.cdiv(N, BLOCK_N)
    first_t = (pid // (GROUP_T * blocks_n)) * GROUP_T
    group_size = tl.minimum(blocks_t - first_t, GROUP_T)
    pid_t = first_t + (pid % (GROUP_T * blocks_n)) % group_size
    pid_n = (pid % (GROUP_T * blocks_n)) // group_size

    rt = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)  # (BT,) token rows
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # (BN,) output columns
    rd = tl.arange(0, BLOCK_D)
    t_ok, n_ok = rt < T, rn < N
    x_rows = x_ptr + rt.to(tl.int64)[:, None] * stride_xt  # (BT, 1)
    w_rows = w_ptr + rn.to(tl.int64)[:, None] * stride_wn  # (BN, 1)
    acc = tl.zeros((BLOCK_T, BLOCK_N), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):  # base GEMM: x W^T
        d_ok = d0 + rd < D
        x = tl.load(x_rows + (d0 + rd)[None, :] * stride_xd, mask=t_ok[:, None] & d_ok[None, :], other=0.0)  # (BT, BD)
        w = tl.load(w_rows + (d0 + rd)[None, :] * stride_wd, mask=n_ok[:, None] & d_ok[None, :], other=0.0)  # (BN, BD)
        if UPCAST:
            x, w = x.to(tl.float32), w.to(tl.float32)
        acc = tl.dot(x, tl.trans(w), acc, input_precision=PRECISION)  # (BT, BN)

    if HAS_LORA:  # expand in the epilogue: + h B^T over this tile's projections' rank columns only
        n_first = pid_n * BLOCK_N
        n_last = tl.minimum(n_first + BLOCK_N, N) - 1
        r_lo = tl.where(n_first >= N2, R2, tl.where(n_first >= N1, R1, 0))
        r_hi = tl.where(n_last >= N2, R, tl.where(n_last >= N1, R2, R1))
        rr = tl.arange(0, BLOCK_R)
        h_rows = h_ptr + rt.to(tl.int64)[:, None] * stride_ht  # (BT, 1)
        b_rows = b_ptr + rn.to(tl.int64)[:, None] * stride_bn  # (BN, 1)
        for r0 in range(r_lo, r_hi, BLOCK_R):
            r_ok = r0 + rr < r_hi
            h = tl.load(h_rows + (r0 + rr)[None, :] * stride_hr, mask=t_ok[:, None] & r_ok[None, :], other=0.0)
            b = tl.load(b_rows + (r0 + rr)[None, :] * stride_br, mask=n_ok[:, None] & r_ok[None, :], other=0.0)
            if UPCAST:
                b = b.to(tl.float32)
            acc = tl.dot(h.to(b.dtype), tl.trans(b), acc, input_precision=PRECISION)  # (BT, BR) @ (BR, BN)

    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    y_ptrs = y_ptr + rt.to(tl.int64)[:, None] * stride_yt + rn[None, :] * stride_yn
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=t_ok[:, None] & n_ok[None, :])


def _configs(names: tuple[str, ...], rows: list[tuple[int, ...]], **fixed: int) -> list[triton.Config]:
    """One triton.Config per row: the block sizes named by `names`, then num_warps and num_stages."""
    return [
        triton.Config({**dict(zip(names, row[:-2])), **fixed}, num_warps=row[-2], num_stages=row[-1]) for row in rows
    ]


# Shrink tiles (BLOCK_T, BLOCK_R, warps, stages): one R block of up to 256 ranks reads x once.
_SHRINK_CONFIGS = _configs(("BLOCK_T", "BLOCK_R"), [(64, 64, 4, 3), (64, 128, 4, 3), (32, 256, 8, 3), (128, 64, 4, 4)],
                           BLOCK_D=64)  # fmt: skip
# Fused GEMM tiles (BLOCK_T, BLOCK_N, warps, stages): the usual Ampere/Hopper 16-bit GEMM tiles.
_FUSED_CONFIGS = _configs(("BLOCK_T", "BLOCK_N"),
                          [(128, 128, 8, 3), (128, 256, 8, 3), (64, 128, 4, 4), (128, 64, 4, 4), (64, 64, 4, 3)],
                          BLOCK_D=64, BLOCK_R=32, GROUP_T=8)  # fmt: skip
_shrink_tuned = triton.autotune(configs=_SHRINK_CONFIGS, key=["T", "D", "R"])(_shrink_kernel)
_fused_tuned = triton.autotune(configs=_FUSED_CONFIGS, key=["T", "N", "D", "R"])(_fused_kernel)
# The interpreter (TRITON_INTERPRET=1, CPU tensors) runs one small configuration instead of autotuning.
_INTERPRET_SHRINK = {"BLOCK_T": 16, "BLOCK_R": 16, "BLOCK_D": 16}
_INTERPRET_FUSED = {"BLOCK_T": 16, "BLOCK_N": 16, "BLOCK_D": 16, "BLOCK_R": 16, "GROUP_T": 2}


_INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") == "1"  # read by triton at import, so read once here too


def interpreting() -> bool:
    """Whether triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1 before triton was imported)."""
    return _INTERPRETING


def _precision(dtype: torch.dtype) -> str:
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"  # triton's default; only fp32 operands read it


def _bounds(sizes: Sequence[int], rank_sizes: Sequence[int]) -> tuple[int, int, int, int]:
    """(N1, N2, R1, R2) of up to three packed projections; more are run as one dense block (still exact)."""
    n, r = sum(sizes), sum(rank_sizes)
    if len(sizes) == 2:
        return sizes[0], n, rank_sizes[0], r
    if len(sizes) == 3:
        return sizes[0], sizes[0] + sizes[1], rank_sizes[0], rank_sizes[0] + rank_sizes[1]
    return n, n, r, r


def _forward(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    s: torch.Tensor,
    groups: torch.Tensor,
    bounds: tuple[int, int, int, int],
) -> torch.Tensor:
    """Shrink, then fused GEMM: x (T, D), weight (N, D), lora_a (R, D), lora_b (N, R), s (T, G) -> (T, N).

    groups (R,) int32 names the column of s that scales each rank column.
    """
    (t, d), n, r = x.shape, weight.shape[0], lora_a.shape[0]
    y = torch.empty(t, n, dtype=x.dtype, device=x.device)  # (T, N)
    if t == 0 or n == 0:
        return y
    interpret = interpreting()
    precision = _precision(x.dtype)
    upcast = interpret and x.dtype != torch.float32
    h = y  # placeholder pointer when there are no ranks
    if r:
        h = torch.empty(t, r, dtype=torch.float32, device=x.device)  # (T, R) scaled shrink
        shrink = _shrink_kernel if interpret else _shrink_tuned
        grid = lambda meta: (triton.cdiv(t, meta["BLOCK_T"]), triton.cdiv(r, meta["BLOCK_R"]))  # noqa: E731
        shrink[grid](
            x, lora_a, s, groups, h, t, d, r,
            x.stride(0), x.stride(1), lora_a.stride(0), lora_a.stride(1), s.stride(0), s.stride(1),
            h.stride(0), h.stride(1), PRECISION=precision, UPCAST=upcast, **(_INTERPRET_SHRINK if interpret else {}),
        )  # fmt: skip
    fused = _fused_kernel if interpret else _fused_tuned
    grid = lambda meta: (triton.cdiv(t, meta["BLOCK_T"]) * triton.cdiv(n, meta["BLOCK_N"]),)  # noqa: E731
    b = lora_b if r else weight
    fused[grid](
        x, weight, y if bias is None else bias, h, b, y, t, n, d, r, *bounds,
        x.stride(0), x.stride(1), weight.stride(0), weight.stride(1), h.stride(0), h.stride(1),
        b.stride(0), b.stride(1), y.stride(0), y.stride(1),
        HAS_BIAS=bias is not None, HAS_LORA=r > 0, PRECISION=precision, UPCAST=upcast,
        **(_INTERPRET_FUSED if interpret else {}),
    )  # fmt: skip
    return y


class _FusedLoRALinear(torch.autograd.Function):
    """Triton forward; plain-torch backward (the module docstring says why)."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, s, groups, bounds):  # type: ignore[override]
        ctx.save_for_backward(x, weight, lora_a, lora_b, s, groups)
        return _forward(x, weight, bias, lora_a, lora_b, s, groups, bounds)

    @staticmethod
    def backward(ctx, dy):  # type: ignore[override]
        x, weight, lora_a, lora_b, s, groups = ctx.saved_tensors
        need_x, need_w, need_bias, need_a, need_b, need_s = ctx.needs_input_grad[:6]
        dx = dw = dbias = da = db = ds = None
        s_col = s.index_select(1, groups).to(dy.dtype)  # (T, R)
        g = dy @ lora_b  # (T, R): gradient at the scaled shrink output h
        if need_x:
            dx = dy @ weight + (g * s_col) @ lora_a  # (T, D)
        if need_w:
            dw = dy.T @ x  # (N, D)
        if need_bias:
            dbias = dy.sum(0)  # (N,)
        if need_a:
            da = (g * s_col).T @ x  # (R, D)
        if need_b or need_s:
            u = x @ lora_a.T  # (T, R): the unscaled shrink, recomputed
            if need_b:
                db = dy.T @ (u * s_col)  # (N, R)
            if need_s:
                ds = s.new_zeros(s.shape).index_add_(1, groups, (g * u).to(s.dtype))  # (T, G)
        return dx, dw, dbias, da, db, ds, None, None


def _apply(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    s: torch.Tensor,
    groups: torch.Tensor,
    bounds: tuple[int, int, int, int],
) -> torch.Tensor:
    tensors = (x, weight, bias, lora_a, lora_b, s)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        return _FusedLoRALinear.apply(*tensors, groups, bounds)
    return _forward(*tensors, groups, bounds)


def lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scales: torch.Tensor | float,
    ranks: Sequence[int],
) -> torch.Tensor:
    """`lora_kernels.reference.lora_linear` in Triton: x (..., d_in) -> (..., N); lora_b is treated as dense."""
    lead, (n, r) = x.shape[:-1], lora_b.shape
    x2 = x.reshape(-1, x.shape[-1])  # (T, d_in)
    s = token_scales(scales, lead, len(ranks), x.device).to(device=x.device, dtype=torch.float32)  # (T, G)
    y = _apply(x2, weight, bias, lora_a, lora_b, s, group_index(ranks, x.device), (n, n, r, r))  # (T, N)
    return y.reshape(*lead, n)


def projections(x: torch.Tensor, packed: PackedProjections, scales: torch.Tensor | float) -> tuple[torch.Tensor, ...]:
    """`lora_kernels.reference.projections` in Triton: a tuple of (..., d_p), one fused launch pair for all P."""
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])  # (T, d_in)
    s = token_scales(scales, lead, packed.n_adapters, x.device).to(device=x.device, dtype=torch.float32)  # (T, K)
    groups = group_index(packed.ranks, x.device, modulo=packed.n_adapters)  # (R,): column of s, shared by projections
    bounds = _bounds(packed.sizes, packed.rank_sizes)
    y = _apply(x2, packed.weight, packed.bias, packed.lora_a, packed.lora_b, s, groups, bounds)  # (T, N)
    return tuple(part.reshape(*lead, part.shape[-1]) for part in y.split(packed.sizes, dim=1))


def fused_qkv(
    x: torch.Tensor,
    weights: Sequence[torch.Tensor],
    biases: Sequence[torch.Tensor | None],
    adapters: Sequence[Sequence[Factor]],
    scales: torch.Tensor | float,
) -> tuple[torch.Tensor, ...]:
    """`lora_kernels.reference.fused_qkv` in Triton (self-attention q|k|v, or cross-attention q alone and k|v on the
    context)."""
    return projections(x, pack(weights, biases, adapters), scales)
