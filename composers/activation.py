"""Per-UNet-call adapter activation and a thin, removable wrapper around the UNet's forward.

Activation goes through PEFT's own switches on each tuner layer (`set_adapter` + `set_scale`:
`studio.library.load.activate_in`, which `set_weights` runs on every component), one model at a time: a composer
switches the UNet per call or step while the text encoders keep the weights the set was loaded with.
The wrapper replaces `unet.forward` on the instance only; removing it restores the exact original method.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch

from studio.library.load import activate_in


# (original_forward, sample, timestep, *args, **kwargs) -> UNet output, same structure as the original's.
ForwardWrapper = Callable[..., Any]


def activate(model: torch.nn.Module, weights: dict[str, float]) -> None:
    """Make exactly the adapters in `weights` active in `model`, each at its weight (scale = w * alpha / r)."""
    activate_in(model, weights)


def wrap_forward(module: torch.nn.Module, wrapper: ForwardWrapper) -> Callable[[], None]:
    """Route `module(...)` through `wrapper(original_forward, ...)`; returns the function that undoes it."""
    had_own = "forward" in module.__dict__  # e.g. an accelerate offload hook already set one
    previous = module.__dict__.get("forward")
    original = module.forward
    module.forward = functools.partial(wrapper, original)

    def undo() -> None:
        if had_own:
            module.forward = previous
        else:
            del module.forward

    return undo


def step_of(scheduler: Any, timestep: torch.Tensor | float | int) -> tuple[int, int]:
    """(0-based step index, total steps) of `timestep` in the scheduler's current schedule."""
    timesteps = scheduler.timesteps  # (K,)
    t = torch.as_tensor(timestep, dtype=torch.float64).flatten()[0]
    step = int((timesteps.to(torch.float64).cpu() - t.cpu()).abs().argmin())
    return step, len(timesteps)


def sample_of(output: Any) -> torch.Tensor:
    """The noise prediction inside a UNet output (a tuple with `return_dict=False`, else an output object)."""
    return output[0] if isinstance(output, tuple) else output.sample


def with_sample(output: Any, sample: torch.Tensor) -> Any:
    """`output` with its noise prediction replaced by `sample`, keeping the structure the pipeline expects."""
    if isinstance(output, tuple):
        return (sample, *output[1:])
    output.sample = sample
    return output
