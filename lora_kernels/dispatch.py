"""One entry point per op that picks Triton or the reference per call, and an attention processor built on it.

Backend choice (`choose_backend`): an explicit `backend=` argument, else the `STUDIO_KERNELS` environment variable,
else "auto". "reference" always runs `lora_kernels.reference`. "auto" runs `lora_kernels.triton_lora` when every
check passes (x on CUDA, triton imports, one of fp16/bf16/fp32 shared by every operand, one device, shapes that fit)
and the reference otherwise, logging the reason once. "triton" raises the failing check's message instead of falling
back.
The checks follow diffusers' attention dispatcher (diffusers/models/attention_dispatch.py, constraints per backend).

`FusedLoRAAttnProcessor` is diffusers' `AttnProcessor2_0` (diffusers 0.42; its frame: `lora_kernels.frame`) with the
projections replaced: self-attention computes q, k and v in one fused call (x read once); cross-attention computes q
alone on the hidden states and k, v fused on the encoder states, since they read different inputs. to_out[0] goes
through the same op.
"""

from __future__ import annotations

import functools
import importlib
import logging
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from lora_kernels import reference
from lora_kernels.frame import AttentionFrame, attention, heads
from lora_kernels.reference import Factor, PackedProjections


logger = logging.getLogger(__name__)
BACKENDS = ("auto", "reference", "triton")
ENV_VAR = "STUDIO_KERNELS"
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@functools.cache
def triton_module(name: str = "triton_lora") -> tuple[Any, str | None]:
    """(lora_kernels.<name> or None, why not): a Triton module, imported once, on first need."""
    try:
        return importlib.import_module(f"lora_kernels.{name}"), None
    except Exception as exc:  # ImportError, or a triton that fails to initialise
        return None, f"triton does not import ({type(exc).__name__}: {exc})"


def _why_not_triton(x: torch.Tensor, weight: torch.Tensor, operands: Sequence[torch.Tensor | None]) -> str | None:
    """The first check the Triton backend fails for these operands, or None when it can run them."""
    module, reason = triton_module()
    if module is None:
        return reason
    if x.device.type != "cuda" and not module.interpreting():
        return f"x is on {x.device.type}, the Triton kernel needs a CUDA device (or TRITON_INTERPRET=1)"
    tensors = [x, weight, *[t for t in operands if t is not None]]
    if x.dtype not in _DTYPES:
        return f"x is {x.dtype}; the Triton kernel takes {', '.join(map(str, _DTYPES))}"
    if any(t.dtype != x.dtype for t in tensors):
        return f"operands mix dtypes {sorted({str(t.dtype) for t in tensors})}; cast them to one"
    if any(t.device != x.device for t in tensors):
        return f"operands are on several devices {sorted({str(t.device) for t in tensors})}"
    if weight.ndim != 2 or x.shape[-1] != weight.shape[1]:
        return f"x (..., {x.shape[-1]}) does not fit weight {tuple(weight.shape)}"
    return None


def choose_backend(
    x: torch.Tensor,
    weight: torch.Tensor,
    operands: Sequence[torch.Tensor | None] = (),
    backend: str | None = None,
) -> str:
    """The backend for these operands, "reference" or "triton" (module docstring); raises if "triton" fails a check."""
    name = (backend or os.environ.get(ENV_VAR) or "auto").lower()
    if name not in BACKENDS:
        raise ValueError(f"unknown kernel backend {name!r} (from backend= or ${ENV_VAR}); use one of {BACKENDS}")
    if name == "reference":
        return name
    reason = _why_not_triton(x, weight, operands)
    if reason is None:
        return "triton"
    if name == "triton":
        raise RuntimeError(f"backend 'triton' cannot run this call: {reason}; use backend='auto' to fall back")
    _log_once(reason)
    return "reference"


@functools.cache
def _log_once(reason: str) -> None:
    logger.info("fused LoRA kernels: using the torch reference (%s)", reason)


def _module(name: str) -> Any:
    return reference if name == "reference" else triton_module()[0]


def lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scales: torch.Tensor | float,
    ranks: Sequence[int],
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """`x W^T + b + ((x A_cat^T) * S_col) B_cat^T` (lora_kernels.reference.lora_linear) on the chosen backend."""
    name = choose_backend(x, weight, (bias, lora_a, lora_b), backend)
    return _module(name).lora_linear(x, weight, bias, lora_a, lora_b, scales, ranks)


def projections(
    x: torch.Tensor, packed: PackedProjections, scales: torch.Tensor | float, *, backend: str | None = None
) -> tuple[torch.Tensor, ...]:
    """Every packed projection of x (lora_kernels.reference.projections) on the chosen backend."""
    name = choose_backend(x, packed.weight, (packed.bias, packed.lora_a, packed.lora_b), backend)
    return _module(name).projections(x, packed, scales)


def fused_qkv(
    x: torch.Tensor,
    weights: Sequence[torch.Tensor],
    biases: Sequence[torch.Tensor | None],
    adapters: Sequence[Sequence[Factor]],
    scales: torch.Tensor | float,
    *,
    backend: str | None = None,
) -> tuple[torch.Tensor, ...]:
    """q, k, v (or any projections of one x) with K adapters each (`reference.fused_qkv`), on the chosen backend."""
    return projections(x, reference.pack(weights, biases, adapters), scales, backend=backend)


# One adapter on one projection: (A (r, d_in), B (d_out, r), static scale such as alpha / r), or None when absent.
Triple = tuple[torch.Tensor, torch.Tensor, float] | None
# Scales for one call: a float, a tensor (K,), (B, K) or (B, N, K), or a function (batch, tokens) -> such a tensor.
Scales = float | torch.Tensor | Callable[[int, int], torch.Tensor]


@dataclass
class AdapterFactors:
    """K adapters' LoRA factors on one diffusers `Attention`: one list per projection, one entry per adapter."""

    q: list[Triple]
    k: list[Triple]
    v: list[Triple]
    out: list[Triple] | None = None  # to_out[0]; None leaves to_out untouched

    def __post_init__(self) -> None:
        lengths = {len(self.q), len(self.k), len(self.v), *([len(self.out)] if self.out is not None else [])}
        if len(lengths) != 1:
            raise ValueError(f"AdapterFactors lists differ in length {sorted(lengths)}; use None for absent adapters")

    @property
    def n_adapters(self) -> int:
        return len(self.q)


def region_scales(mask: torch.Tensor) -> Callable[[int, int], torch.Tensor]:
    """Per-token scales from a region mask (B, K, H, W), resized (nearest) to each layer's token grid: (B, N, K).

    A layer with N tokens is taken to keep the mask's aspect ratio: h w = N, h / w = H / W.
    """
    height, width = mask.shape[-2:]

    def scales(batch: int, tokens: int) -> torch.Tensor:
        h = round(math.sqrt(tokens * height / width))
        w = tokens // max(h, 1)
        if h * w != tokens:
            raise ValueError(f"{tokens} tokens are not a grid with the mask's aspect ratio {height}x{width}")
        resized = F.interpolate(mask.float(), size=(h, w), mode="nearest")  # (B, K, h, w)
        return resized.flatten(2).transpose(1, 2)  # (B, N, K)

    return scales


def _linear_of(layer: torch.nn.Module, name: str) -> torch.nn.Linear:
    """The nn.Linear under `layer` (PEFT LoraLayer-wrapped or plain); refuses PEFT adapters it would skip."""
    base = layer.get_base_layer() if hasattr(layer, "get_base_layer") else layer
    pending = [
        n
        for n in getattr(layer, "active_adapters", [])
        if n in getattr(layer, "lora_A", {}) and n not in getattr(layer, "merged_adapters", [])
    ]
    if pending and not getattr(layer, "disable_adapters", False):
        raise ValueError(
            f"{name} has active, unmerged PEFT adapters {pending} that FusedLoRAAttnProcessor would skip: pass their"
            " factors in AdapterFactors and disable them (model.disable_adapters()), or merge them"
        )
    if not isinstance(base, torch.nn.Linear):
        raise TypeError(f"{name} is {type(base).__name__}; FusedLoRAAttnProcessor needs nn.Linear projections")
    return base


class FusedLoRAAttnProcessor(AttentionFrame):
    """`AttnProcessor2_0` with q/k/v (and to_out[0]) computed by the fused adapter projection.

    `scales` apply to the hidden-state tokens: q, the k and v of self-attention, and to_out. `context_scales` apply
    to k and v of cross-attention (encoder-state tokens); by default they are `scales` when those do not vary per
    token, else each sample's largest scale per adapter over its tokens (an adapter active anywhere in a sample
    shapes that sample's keys and values at its full weight; constant S still equals merged weights).
    Packed weights are cached per device and dtype; call `refresh()` after changing weights or factors in place.
    """

    def __init__(
        self,
        factors: AdapterFactors,
        scales: Scales = 1.0,
        context_scales: Scales | None = None,
        backend: str | None = None,
    ) -> None:
        self.factors = factors
        self.scales = scales
        self.context_scales = context_scales
        self.backend = backend
        self._packs: dict[tuple, PackedProjections] = {}

    def refresh(self) -> None:
        self._packs.clear()

    def _pack(self, attn: Any, which: str, dtype: torch.dtype) -> PackedProjections:
        layers = {"q": attn.to_q, "k": attn.to_k, "v": attn.to_v, "out": attn.to_out[0]}
        linears = [_linear_of(layers[p], f"to_{p}") for p in which.split("|")]
        key = (which, dtype, *[(lin.weight.data_ptr(), lin.weight._version) for lin in linears])
        if key in self._packs:
            return self._packs[key]
        weights = [lin.weight.to(dtype) for lin in linears]
        adapters = [
            [None if t is None else (t[0], t[1] * t[2]) for t in getattr(self.factors, p)] for p in which.split("|")
        ]
        biases = [None if lin.bias is None else lin.bias.to(dtype) for lin in linears]
        packed = reference.pack(weights, biases, adapters)
        if not (torch.is_grad_enabled() and any(t.requires_grad for t in (packed.weight, packed.lora_a))):
            self._packs[key] = packed  # a pack that carries an autograd graph is rebuilt every call
        return packed

    def _scales(self, scales: Scales, batch: int, tokens: int) -> torch.Tensor | float:
        return scales(batch, tokens) if callable(scales) else scales

    def attend(self, attn: Any, hidden_states: torch.Tensor, context: torch.Tensor | None,
               attention_mask: torch.Tensor | None) -> torch.Tensor:
        batch, tokens, _ = hidden_states.shape
        dtype = hidden_states.dtype
        s = self._scales(self.scales, batch, tokens)  # (K,), (B, K) or (B, N, K)
        if context is None:  # self-attention: q, k, v from one read of the hidden states
            packed = self._pack(attn, "q|k|v", dtype)
            query, key, value = projections(hidden_states, packed, s, backend=self.backend)  # (B, N, d_p) each
        else:  # cross-attention: q on the hidden states, k and v fused on the encoder states
            (query,) = projections(hidden_states, self._pack(attn, "q", dtype), s, backend=self.backend)
            if attn.norm_cross:
                context = attn.norm_encoder_hidden_states(context)
            s_ctx = self._context_scales(s, batch, context.shape[1])
            key, value = projections(context, self._pack(attn, "k|v", context.dtype), s_ctx, backend=self.backend)
        out = attention(attn, heads(attn, query), heads(attn, key), heads(attn, value), attention_mask)  # (B, L, C)
        if self.factors.out is None:
            return attn.to_out[0](out)
        (out,) = projections(out, self._pack(attn, "out", dtype), s, backend=self.backend)
        return out

    def _context_scales(self, s: torch.Tensor | float, batch: int, tokens: int) -> torch.Tensor | float:
        if self.context_scales is not None:
            return self._scales(self.context_scales, batch, tokens)
        if isinstance(s, torch.Tensor) and s.ndim == 3:
            return s.amax(dim=1)  # (B, K): each sample's largest weight per adapter
        return s
