"""LoRA Switch: one adapter active per denoising step, cycling every tau steps in a given order.

Zhong et al., "Multi-LoRA Composition for Image Generation", arXiv:2402.16843, §2.2: with k adapters and period tau,
the adapter active at step t (1-based) is `i = floor(((t - 1) mod k tau) / tau) + 1`, and `W'_t = W + w_i B_i A_i`.
The paper switches in a step-end callback; here a thin wrapper around the UNet's forward picks the adapter from the
call's timestep, so it also holds for calls `generate()` makes. Text encoders keep the whole set at its weights.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from composers.activation import activate, step_of, wrap_forward
from composers.adapter_set import AdapterSet
from composers.handle import Handle
from studio.configs import check_numbers
from studio.errors import StudioError


# Paper default order: character -> clothing -> style -> background -> object; in the studio's kinds:
KIND_ORDER = ("subject", "style", "content", "unknown")


@dataclass
class SwitchConfig:
    tau: int = field(default=5, metadata={"help": "steps each adapter stays active (paper default 5)"})
    order: list[str] | None = field(
        default=None,
        metadata={"help": "adapter names in switching order; default subject, style, content, then the rest"},
    )

    def __post_init__(self) -> None:
        check_numbers(self)
        if self.tau < 1:
            raise StudioError(f"--tau must be at least 1, got {self.tau}")


def switch_index(step: int, k: int, tau: int) -> int:
    """0-based index of the adapter active at 0-based `step`: Zhong et al. §2.2 with t = step + 1."""
    return (step % (k * tau)) // tau


def switch_order(adapters: AdapterSet, order: list[str] | None) -> list[str]:
    if order is None:
        kinds = adapters.kinds or ["unknown"] * len(adapters.names)
        rank = {n: KIND_ORDER.index(k) for n, k in zip(adapters.names, kinds)}
        return sorted(adapters.names, key=rank.__getitem__)  # stable: one kind keeps the given order
    if sorted(order) != sorted(adapters.names):
        raise StudioError(f"--order {','.join(order)} must list each adapter once: {','.join(adapters.names)}")
    return list(order)


@dataclass
class SwitchState:
    order: list[str]
    history: list[tuple[int, str]] = field(default_factory=list)  # (step, active adapter) per UNet call


def apply_switch(pipe: Any, adapters: AdapterSet, config: SwitchConfig) -> Handle:
    order = switch_order(adapters, config.order)
    state = SwitchState(order)

    def forward(original: Callable[..., Any], sample: torch.Tensor, timestep: Any, *args: Any, **kw: Any) -> Any:
        step, total = step_of(pipe.scheduler, timestep)
        name = order[switch_index(step, len(order), config.tau)]
        activate(pipe.unet, {name: adapters.weights_at(step, total)[name]})  # W'_t = W + w_i B_i A_i
        state.history.append((step, name))
        return original(sample, timestep, *args, **kw)

    weights = dict(zip(adapters.names, adapters.weights))
    return Handle("switch", [lambda: activate(pipe.unet, weights), wrap_forward(pipe.unet, forward)], state)
