"""Crosstalk of adapters merged by a sum: does adapter j's residual answer concept i's inputs?

Orthogonal adaptation (Po et al., CVPR 2024, section 4, eq. 6-7) keeps concept i in a sum when dW_j X_i ~ 0 for
every other concept j, X_i the layer inputs while concept i is drawn. This measures it on every adapted UNet layer:

    rho_ij = sqrt( sum_x ||dW_j x||^2 / sum_x ||dW_i x||^2 ),   x over concept i's inputs (all layers, steps, tokens)

with adapter i alone active (so X_i are the inputs of i's own generation) and dW at weight 1 (PEFT's alpha / r, or
alpha / sqrt(r) with rsLoRA). rho << 1 is the paper's premise; rho ~ 1 means the other residual fires on this
concept as hard as its own does, and a sum adds it at full strength. Reported overall and per kind of layer.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from studio.errors import StudioError


KINDS = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out", "attn2.to_q", "attn2.to_k", "attn2.to_v",
         "attn2.to_out", "ff.net", "proj_in", "proj_out", "conv")


def layer_kind(name: str) -> str:
    return next((k for k in KINDS if k in name), "other")


def unit_scale(layer: nn.Module, adapter: str) -> float:
    """The residual's scale at weight 1, whatever weight the adapter is loaded at now."""
    r, alpha = layer.r[adapter], layer.lora_alpha[adapter]
    return alpha / math.sqrt(r) if layer.use_rslora.get(adapter, False) else alpha / r


def residual(layer: nn.Module, adapter: str, x: torch.Tensor) -> torch.Tensor:
    """dW x of one LoRA layer's adapter at weight 1 (no dropout): lora_B(lora_A(x)) * scale, linear or conv."""
    return layer.lora_B[adapter](layer.lora_A[adapter](x)) * unit_scale(layer, adapter)


def lora_layers(model: nn.Module, names: list[str]) -> dict[str, nn.Module]:
    """The layers of `model` that hold every adapter of `names` as LoRA (none for LoKr or sparse deltas)."""
    return {n: m for n, m in model.named_modules()
            if isinstance(getattr(m, "lora_A", None), nn.ModuleDict) and all(a in m.lora_A for a in names)}


def crosstalk(model: nn.Module, names: list[str], run: Callable[[int], None]) -> dict[str, dict[str, float]]:
    """rho of every adapter in `names` (LoRA adapters loaded into `model` together) against each other one.

    `run(i)` must make adapter `names[i]` the only active one and draw concept i (its prompts). Returns, per adapter
    i, rho overall ("all") and per layer kind, with j summed over the other adapters."""
    if len(names) < 2:
        raise StudioError("crosstalk needs at least two adapters")
    layers = lora_layers(model, names)
    if not layers:
        raise StudioError(f"no layer holds all of {names} as LoRA adapters (crosstalk reads LoRA residuals only)")
    sums: dict[str, list[float]] = {}  # layer -> [own, others], for the concept being drawn
    current = [0]

    def hook(name: str) -> Callable[..., None]:
        def record(layer: nn.Module, args: tuple) -> None:
            x = args[0]
            with torch.no_grad():
                energy = [float(residual(layer, a, x).float().pow(2).sum()) for a in names]
            own = energy[current[0]]
            row = sums.setdefault(name, [0.0, 0.0])
            row[0] += own
            row[1] += sum(energy) - own
        return record

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in layers.items()]
    out: dict[str, dict[str, float]] = {}
    try:
        for i, name in enumerate(names):
            current[0] = i
            sums.clear()
            run(i)
            kinds: dict[str, list[float]] = {}
            for layer, (own, other) in sums.items():
                k = kinds.setdefault(layer_kind(layer), [0.0, 0.0])
                k[0] += own
                k[1] += other
            total = [sum(v[0] for v in kinds.values()), sum(v[1] for v in kinds.values())]
            out[name] = {"all": _rho(*total), **{k: _rho(*v) for k, v in sorted(kinds.items())}}
    finally:
        for h in handles:
            h.remove()
    return out


def _rho(own: float, other: float) -> float:
    return round(math.sqrt(other / own), 4) if own > 0 else float("nan")
