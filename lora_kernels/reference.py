"""The specification of the fused adapter projection, in plain torch (DESIGN.md section 7).

One projection with K adapters, per token t:

    y = x W^T + b + sum_k S[t, k] (x A_k^T) B_k^T                                   (1)

x (T, d_in) token rows, W (d_out, d_in), b (d_out,), A_k (r_k, d_in), B_k (d_out, r_k), S (T, K) one scale per token
and adapter. S changes per token (region masks), per sample and per step, so it cannot be folded into W; a constant
S turns (1) into merged weights, W + sum_k s_k B_k A_k.

Ranks are concatenated, as Nunchaku concatenates LoRA ranks onto its low-rank branch (arXiv 2411.05007; nunchaku
docs, usage/lora.rst), so the K adapters cost one shrink and one expand:

    A_cat  (R, d_in)    rows [o_k, o_k + r_k) hold A_k            R = sum_k r_k,  o_k = r_0 + ... + r_{k-1}
    B_cat  (d_out, R)   columns [o_k, o_k + r_k) hold B_k
    S_col  (T, R)       S_col[t, j] = S[t, k] for j in [o_k, o_k + r_k)             (column_scales)
    y = x W^T + b + ((x A_cat^T) * S_col) B_cat^T                                   (2)

Projections that read the same x (q, k, v of self-attention; k, v of cross-attention, which read the encoder states)
are packed into one, like vLLM's packed q|k|v output slices (vllm/lora/punica_wrapper/punica_gpu.py,
add_lora_linear): W stacked by rows (sum_p d_p, d_in), the (projection, adapter) groups of A stacked by rows in the
order (p0, k0), (p0, k1), ..., (p1, k0), ..., B block-diagonal (sum_p d_p, sum_p R_p) so that projection p's rows see
only its own rank columns, and S repeated once per projection (T, P K). Then (2) computes all P projections from one
read of x, and the output is split back by rows.

Everything here is plain torch in the inputs' dtype (CUDA matmuls accumulate 16-bit inputs in fp32); it is the
fallback on a CPU and the ground truth the Triton kernel is tested against.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F


# One adapter on one projection: (A (r, d_in), B (d_out, r)); None where the adapter does not touch the projection.
Factor = tuple[torch.Tensor, torch.Tensor] | None


@dataclass(frozen=True)
class PackedProjections:
    """P projections of one input and K adapters on each, packed for (2) (see the module docstring)."""

    weight: torch.Tensor  # (N, d_in), N = sum_p d_p: W_0; W_1; ... stacked by rows
    bias: torch.Tensor | None  # (N,) or None when no projection has a bias
    lora_a: torch.Tensor  # (R, d_in): A of group (p, k) in rows [o_pk, o_pk + r_pk), p-major
    lora_b: torch.Tensor  # (N, R): block-diagonal, B of group (p, k) in rows of p, columns [o_pk, o_pk + r_pk)
    ranks: tuple[int, ...]  # (P K,) rank of each (projection, adapter) group, in lora_a's row order
    sizes: tuple[int, ...]  # (P,) output width d_p of each projection
    n_adapters: int  # K

    @property
    def rank_sizes(self) -> tuple[int, ...]:
        """(P,) total rank R_p of each projection's adapters."""
        k = self.n_adapters
        return tuple(sum(self.ranks[p * k : (p + 1) * k]) for p in range(len(self.sizes)))


def pack(
    weights: Sequence[torch.Tensor],
    biases: Sequence[torch.Tensor | None],
    adapters: Sequence[Sequence[Factor]],
) -> PackedProjections:
    """Pack projections `weights[p]` (d_p, d_in) with `adapters[p][k] = (A (r, d_in), B (d_p, r))` or None.

    Every projection lists the same K adapters (None where adapter k has no factors on it: rank 0). Differentiable:
    gradients flow back to the given weights and factors. Static factors (alpha / r, a user weight) belong in B.
    """
    if not weights or len(weights) != len(biases) or len(weights) != len(adapters):
        raise ValueError(
            f"pack needs one bias and one adapter list per weight; got {len(weights)} weights, {len(biases)} biases"
            f" and {len(adapters)} adapter lists"
        )
    d_in = weights[0].shape[1]
    n_adapters = len(adapters[0])
    ref = weights[0]
    a_rows: list[torch.Tensor] = []
    b_blocks: list[torch.Tensor] = []
    ranks: list[int] = []
    for p, (w, factors) in enumerate(zip(weights, adapters, strict=True)):
        if w.ndim != 2 or w.shape[1] != d_in:
            raise ValueError(f"weight {p} has shape {tuple(w.shape)}; every projection must be (d_out, {d_in})")
        if len(factors) != n_adapters:
            raise ValueError(f"projection {p} lists {len(factors)} adapters, projection 0 {n_adapters}; use None")
        b_cols: list[torch.Tensor] = []
        for k, factor in enumerate(factors):
            if factor is None:
                ranks.append(0)
                continue
            a, b = factor
            r = a.shape[0]
            if a.shape != (r, d_in) or b.shape != (w.shape[0], r):
                raise ValueError(
                    f"adapter {k} on projection {p}: A {tuple(a.shape)} and B {tuple(b.shape)} do not fit; expected"
                    f" A (r, {d_in}) and B ({w.shape[0]}, r)"
                )
            a_rows.append(a.to(ref))
            b_cols.append(b.to(ref))
            ranks.append(r)
        b_blocks.append(torch.cat(b_cols, dim=1) if b_cols else ref.new_zeros(w.shape[0], 0))  # (d_p, R_p)
    weight = torch.cat(list(weights), dim=0)  # (N, d_in)
    bias = None
    if any(b is not None for b in biases):
        bias = torch.cat([ref.new_zeros(w.shape[0]) if b is None else b.to(ref) for w, b in zip(weights, biases)])
    lora_a = torch.cat(a_rows, dim=0) if a_rows else ref.new_zeros(0, d_in)  # (R, d_in)
    lora_b = torch.block_diag(*b_blocks)  # (N, R)
    sizes = tuple(int(w.shape[0]) for w in weights)
    return PackedProjections(weight, bias, lora_a, lora_b, tuple(ranks), sizes, n_adapters)


def token_scales(
    scales: torch.Tensor | float, lead: Sequence[int], n_adapters: int, device: torch.device | None = None
) -> torch.Tensor:
    """Scales as one row per token: (T, K), T = prod(lead), where `lead` is x's shape without d_in.

    Accepted: a float or (K,) (every token), (B, K) per sample when x is (B, N, d_in), (B, N, K) per token, or
    (T, K) when x is (T, d_in). Sizes of 1 broadcast. A float is made on `device` (no host-to-device copy).
    """
    s = scales if isinstance(scales, torch.Tensor) else torch.full((n_adapters,), float(scales), device=device)
    if s.ndim == 0:
        s = s.expand(n_adapters)
    lead = tuple(int(n) for n in lead)
    if s.shape[-1] != n_adapters:
        raise ValueError(f"scales {tuple(s.shape)} must end in the adapter count {n_adapters}")
    if s.ndim == 2 and len(lead) == 2:
        s = s[:, None, :]  # (B, 1, K): one row per sample
    if s.ndim > len(lead) + 1:
        raise ValueError(f"scales {tuple(s.shape)} have more dimensions than tokens {lead} plus adapters")
    try:
        s = s.expand(*lead, n_adapters)  # (*lead, K)
    except RuntimeError:
        raise ValueError(
            f"scales {tuple(s.shape)} do not broadcast to tokens {lead} x {n_adapters} adapters; pass (K,), (B, K),"
            f" (B, N, K) for x (B, N, d_in), or (T, K) for x (T, d_in)"
        ) from None
    return s.reshape(math.prod(lead), n_adapters)  # (T, K)


def column_scales(scales: torch.Tensor, ranks: Sequence[int]) -> torch.Tensor:
    """Per-rank-column scales S_col (T, R) from per-group scales (T, G): group g's scale repeated r_g times."""
    return scales.index_select(1, group_index(ranks, scales.device))  # (T, R)


def group_index(ranks: Sequence[int], device: torch.device | str = "cpu", modulo: int = 0) -> torch.Tensor:
    """(R,) int32: the scale group g of every rank column (group g owns ranks[g] consecutive columns), or g % modulo.

    Cached per device, so a call copies nothing to the device (and can be captured in a CUDA graph). Read-only.
    """
    return _group_index(tuple(int(r) for r in ranks), torch.device(device), modulo)


@functools.lru_cache(maxsize=256)
def _group_index(ranks: tuple[int, ...], device: torch.device, modulo: int) -> torch.Tensor:
    # A normal tensor even when the first call is in inference mode: a guided sampling step (or a training step)
    # saves it for backward later, which autograd refuses for an inference tensor.
    with torch.inference_mode(False):
        groups = torch.arange(len(ranks)).repeat_interleave(torch.tensor(ranks, dtype=torch.long))  # (R,)
        return (groups % modulo if modulo else groups).to(device=device, dtype=torch.int32)


def lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scales: torch.Tensor | float,
    ranks: Sequence[int],
) -> torch.Tensor:
    """Eq. (2): `x W^T + b + ((x A_cat^T) * S_col) B_cat^T` with G = len(ranks) scale groups.

    x (..., d_in); weight (N, d_in); bias (N,) or None; lora_a (R, d_in); lora_b (N, R); scales broadcastable to
    (T, G) as in `token_scales`; ranks (G,) with sum R. Returns (..., N).
    """
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])  # (T, d_in)
    s = token_scales(scales, lead, len(ranks), x.device).to(device=x.device, dtype=x.dtype)  # (T, G)
    y = F.linear(x2, weight, bias)  # (T, N): the base GEMM
    if sum(ranks):
        h = x2 @ lora_a.T  # (T, R): the shrink, every adapter at once
        y = y + (h * column_scales(s, ranks)) @ lora_b.T  # (T, N): the expand
    return y.reshape(*lead, weight.shape[0])


def projections(x: torch.Tensor, packed: PackedProjections, scales: torch.Tensor | float) -> tuple[torch.Tensor, ...]:
    """All packed projections of x (..., d_in) with S broadcastable to (T, K): a tuple of (..., d_p)."""
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])  # (T, d_in)
    s = token_scales(scales, lead, packed.n_adapters, x.device).repeat(1, len(packed.sizes))  # (T, P K), p-major
    y = lora_linear(x2, packed.weight, packed.bias, packed.lora_a, packed.lora_b, s, packed.ranks)  # (T, N)
    return tuple(part.reshape(*lead, part.shape[-1]) for part in y.split(packed.sizes, dim=1))


def fused_qkv(
    x: torch.Tensor,
    weights: Sequence[torch.Tensor],
    biases: Sequence[torch.Tensor | None],
    adapters: Sequence[Sequence[Factor]],
    scales: torch.Tensor | float,
) -> tuple[torch.Tensor, ...]:
    """q, k, v (or any projections of the same x) with K adapters each, x read once: `projections(x, pack(...))`.

    Self-attention: weights (W_q, W_k, W_v) on the hidden states. Cross-attention: q reads the hidden states but k and
    v read the encoder states, so call this twice: (W_q,) on the hidden states, (W_k, W_v) on the context.
    """
    return projections(x, pack(weights, biases, adapters), scales)
