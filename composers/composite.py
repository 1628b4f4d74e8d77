"""LoRA Composite: every adapter guides every step; their guided noise predictions are averaged.

Zhong et al., "Multi-LoRA Composition for Image Generation", arXiv:2402.16843, §2.2, Eq. for LoRA Composite:
`e(z_t, c) = (1/k) sum_i w_i [ e_i(z_t) + s (e_i(z_t, c) - e_i(z_t)) ]`, the unconditional estimate also computed
with adapter i active. Guidance is linear, so averaging the UNet outputs over adapters (both CFG halves) and
letting the pipeline guide gives the same result, as the paper's code does. As in the paper's experiments, w_i is
the adapter's LoRA scale (the weight in the set) rather than a factor outside the bracket. Cost: k UNet passes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from composers.activation import activate, sample_of, step_of, with_sample, wrap_forward
from composers.adapter_set import AdapterSet
from composers.handle import Handle


@dataclass
class CompositeConfig:
    pass


def apply_composite(pipe: Any, adapters: AdapterSet, config: CompositeConfig) -> Handle:
    def forward(original: Callable[..., Any], sample: torch.Tensor, timestep: Any, *args: Any, **kw: Any) -> Any:
        weights = adapters.weights_at(*step_of(pipe.scheduler, timestep))
        predictions = []
        for name in adapters.names:
            activate(pipe.unet, {name: weights[name]})  # e_{theta'_i}: adapter i alone, at its weight
            out = original(sample, timestep, *args, **kw)
            predictions.append(sample_of(out))  # (2B, C, H, W) with CFG: [uncond_i, cond_i]
        return with_sample(out, torch.stack(predictions).mean(0))  # (1/k) sum_i, both halves

    weights = dict(zip(adapters.names, adapters.weights))
    return Handle("composite", [lambda: activate(pipe.unet, weights), wrap_forward(pipe.unet, forward)])
