"""Adapters merged into the weights, undone bit for bit: for a weighted-merge composer's fused form, and for the
adapters `<lora:...>` tags name, for one generation.

An unmerged LoRA layer computes W x + s B A x, two more matrix products (and, on a GPU, more kernel launches) at
every step; merged, W' = W + s B A costs what the base costs (PEFT's `merge`; diffusers' `fuse_lora`). PEFT's
`unmerge` subtracts and leaves rounding in W that grows with every call, so `merge_exactly` copies the touched
weights first and copies them back, which costs their size in memory. `merged_for_call` does it for a tagged
generation where a copy fits in `BUDGET` and nothing may change the adapters during the call (a composer's
processors, hooks or forward wrapper; a trained adapter); elsewhere the adapters run unmerged as before. On two CPU
cores, studio-tiny with a DreamBooth-LoRA adapter at its defaults took 1.21 s a tagged 20-step image merged against
1.52 s unmerged (0.81 s without the adapter; median of 7 in one run, 2 threads).

While merged, the base modules run in the PEFT layers' place (`take_out`): the model is the plain one with other
weights, so PEFT's per-layer Python is gone from every step, and on a GPU the CUDA graph recorded for plain
generation replays a tagged one too (`studio.cuda_graphs` keys graphs on the PEFT layers present).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from studio.library.warm import tuner_children


BUDGET = 1 << 30  # bytes of weight copies a merged call may hold
COMPONENTS = ("unet", "text_encoder", "text_encoder_2")


def merge_exactly(model: nn.Module, names: Sequence[str], *, take_out: bool = False) -> Callable[[], None]:
    """Merge the active scaled deltas of `names` into `model`'s base weights; returns the exact undo. With `take_out`,
    a merged PEFT layer computes its base module's forward alone (PEFT's merged branch), so the base module takes its
    place until the undo: a plain forward call instead of PEFT's per-call bookkeeping, and
    a CUDA graph recorded for the plain model replays it (its weights are the same tensors, merged in place)."""
    chosen: list[tuple[nn.Module, str, BaseTunerLayer, list[str]]] = []
    for _, parent, attr, module in tuner_children(model):
        present = [n for n in _held(module) if n in names] if not module.disable_adapters else []
        if present:
            chosen.append((parent, attr, module, present))
    layers = [module for *_, module, _ in chosen]
    if not layers:
        return lambda: None
    with torch.no_grad():  # the copies in a few multi-tensor launches on a GPU, not one per tensor
        copies = [torch.empty_like(t) for t in _base_weights(layers)]
        torch._foreach_copy_(copies, _base_weights(layers))
        for *_, module, present in chosen:
            module.merge(adapter_names=present)
    out = [(parent, attr, module) for parent, attr, module, _ in chosen if take_out and module.merged]
    for parent, attr, module in out:  # PEFT's merged branch is `base_layer(x)` alone
        setattr(parent, attr, module.get_base_layer())

    def undo() -> None:
        for parent, attr, module in out:
            setattr(parent, attr, module)
        with torch.no_grad():  # into the weights as they are now (a merge may have given them new tensors)
            torch._foreach_copy_(_base_weights(layers), copies)
        for module in layers:
            module.merged_adapters.clear()

    return undo


def _base_weights(layers: list[BaseTunerLayer]) -> list[torch.Tensor]:
    """The parameters of the layers' base modules, in a fixed order."""
    return [p for layer in layers for p in layer.get_base_layer().parameters(recurse=False)]


def _held(module: BaseTunerLayer) -> list[str]:
    """The active adapters that `module` holds."""
    return [n for n in module.active_adapters if any(n in getattr(module, a, {}) for a in module.adapter_layer_names)]


def _active(model: nn.Module) -> list[BaseTunerLayer]:
    return [m for m in model.modules()
            if isinstance(m, BaseTunerLayer) and not m.disable_adapters and not m.merged and _held(m)]


def why_not_merge(pipe: Any, layers: list[BaseTunerLayer]) -> str | None:
    """None when `layers` can be merged for one plain generation, else why not."""
    from studio.cuda_graphs import eligible

    reason = eligible(pipe.unet)  # a composer's processors, hooks or forward wrappers
    if reason is not None:
        return reason
    if any(p.requires_grad for m in layers for a in m.adapter_layer_names for p in getattr(m, a).parameters()):
        return "an adapter is being trained"
    size = sum(p.numel() * p.element_size() for m in layers for p in m.get_base_layer().parameters(recurse=False))
    if size > BUDGET:
        return f"a copy of the weights they touch ({size >> 20} MB) exceeds {BUDGET >> 20} MB"
    return None


@contextlib.contextmanager
def merged_for_call(pipe: Any) -> Iterator[bool]:
    """Within the block the active adapters are merged into the weights (yields True), unless `why_not_merge` finds
    a reason (yields False); the weights are the same bits afterwards."""
    models = [m for m in (getattr(pipe, c, None) for c in COMPONENTS) if isinstance(m, nn.Module)]
    found = [(model, active) for model in models if (active := _active(model))]
    layers = [layer for _, active in found for layer in active]
    if not layers or why_not_merge(pipe, layers) is not None:
        yield False
        return
    undos = []
    try:
        for model, active in found:
            undos.append(merge_exactly(model, sorted({n for m in active for n in m.active_adapters}), take_out=True))
        yield True
    finally:
        for undo in undos:
            undo()
