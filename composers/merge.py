"""Weighted merge, the baseline of every multi-adapter paper (composers.md section 7; Zhong et al. 2024, §2.2).

Runtime: every adapted layer computes `y = W0 x + sum_i w_i (alpha_i / r_i) B_i A_i x` (PEFT, unfused).
Fused: the same sum is baked into the weights, `W' = W0 + sum_i w_i (alpha_i / r_i) B_i A_i` (Zhong et al. §2.2,
"LoRA Merge"), through PEFT's own `merge()`; removal copies the saved `W0` back, so it is exact (unlike
`unmerge()`, which subtracts and leaves rounding error). Per-step schedules need the runtime form.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from peft.tuners.tuners_utils import BaseTunerLayer

from composers.activation import activate, step_of, wrap_forward
from composers.adapter_set import AdapterSet, constant
from composers.handle import Handle
from studio.errors import StudioError
from studio.library.meta import COMPONENTS


@dataclass
class MergeConfig:
    fused: bool = field(
        default=False,
        metadata={"help": "bake the weighted sum into the weights (no per-step schedules); default: runtime, unfused"},
    )


def fuse(model: torch.nn.Module, names: list[str]) -> Callable[[], None]:
    """Merge the active scaled deltas of `names` into `model`'s base weights; returns the exact undo."""
    saved: list[tuple[BaseTunerLayer, dict[str, torch.Tensor]]] = []
    for module in model.modules():
        if not isinstance(module, BaseTunerLayer):
            continue
        present = [n for n in names if n in module.active_adapters]
        if not present:
            continue
        base = module.get_base_layer()
        saved.append((module, {k: v.detach().clone() for k, v in base.named_parameters(recurse=False)}))
        module.merge(adapter_names=present)

    def undo() -> None:
        for module, params in saved:
            base = module.get_base_layer()
            with torch.no_grad():
                for key, value in params.items():
                    getattr(base, key).copy_(value)
            module.merged_adapters.clear()

    return undo


def apply_merge(pipe: Any, adapters: AdapterSet, config: MergeConfig) -> Handle:
    """Activate (and with `config.fused`, bake in) the weighted sum of the set's adapters."""
    weights = dict(zip(adapters.names, adapters.weights))
    models = [m for m in (getattr(pipe, c, None) for c in COMPONENTS) if isinstance(m, torch.nn.Module)]
    for model in models:
        activate(model, weights)
    handle = Handle("merge")
    scheduled = any(s is not constant for s in adapters.schedules)
    if config.fused:
        if scheduled:
            raise StudioError("a fused merge has fixed weights; drop the schedule or use the runtime merge")
        for model in models:
            handle.add(fuse(model, adapters.names))
    elif scheduled:

        def forward(original: Callable[..., Any], sample: torch.Tensor, timestep: Any, *args: Any, **kw: Any) -> Any:
            activate(pipe.unet, adapters.weights_at(*step_of(pipe.scheduler, timestep)))
            return original(sample, timestep, *args, **kw)

        handle.add(wrap_forward(pipe.unet, forward))
        handle.add(lambda: activate(pipe.unet, weights))
    return handle
