"""Weighted merge, the baseline of every multi-adapter paper (composers.md section 7; Zhong et al. 2024, §2.2).

Runtime: every adapted layer computes `y = W0 x + sum_i w_i (alpha_i / r_i) B_i A_i x` (PEFT, unfused).
Fused: the same sum is baked into the weights, `W' = W0 + sum_i w_i (alpha_i / r_i) B_i A_i` (Zhong et al. §2.2,
"LoRA Merge"), through PEFT's own `merge()`; removal copies the saved `W0` back, so it is exact (unlike
`unmerge()`, which subtracts and leaves rounding error; `studio.library.fuse.merge_exactly`). Per-step schedules
need the runtime form.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from composers.activation import activate, step_of, wrap_forward
from composers.adapter_set import AdapterSet, constant
from composers.handle import Handle
from studio.errors import StudioError
from studio.library.fuse import merge_exactly
from studio.library.meta import COMPONENTS


@dataclass
class MergeConfig:
    fused: bool = field(
        default=False,
        metadata={"help": "bake the weighted sum into the weights (no per-step schedules); default: runtime, unfused"},
    )


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
            handle.add(merge_exactly(model, adapters.names))
    elif scheduled:

        def forward(original: Callable[..., Any], sample: torch.Tensor, timestep: Any, *args: Any, **kw: Any) -> Any:
            activate(pipe.unet, adapters.weights_at(*step_of(pipe.scheduler, timestep)))
            return original(sample, timestep, *args, **kw)

        handle.add(wrap_forward(pipe.unet, forward))
        handle.add(lambda: activate(pipe.unet, weights))
    return handle
