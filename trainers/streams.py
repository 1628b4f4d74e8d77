"""A run's seeded streams and its processes: what makes the loop (`trainers.loop`) exact to resume and to launch.

Every random draw of a run comes from a generator that is a pure function of (seed, stream, keys), so micro-step m
of a resumed run draws what it drew straight through; `accelerate launch` processes meet over gloo on CPUs.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from studio.errors import StudioError


def seeded(seed: int, *keys: int) -> torch.Generator:
    """A CPU generator that is a pure function of (seed, *keys), identical on every machine."""
    high, low = np.random.SeedSequence([seed, *keys]).generate_state(2, np.uint32)
    return torch.Generator().manual_seed(int(high) << 32 | int(low))


def epoch_indices(seed: int, stream: int, start: int, count: int, n: int) -> list[int]:
    """Positions start .. start+count-1 of an endless sequence of seeded permutations of range(n), one per epoch."""
    perms: dict[int, list[int]] = {}
    out = []
    for pos in range(start, start + count):
        epoch, k = divmod(pos, n)
        if epoch not in perms:
            perms[epoch] = torch.randperm(n, generator=seeded(seed, stream, epoch)).tolist()
        out.append(perms[epoch][k])
    return out


def process_state(device: str) -> Any:  # -> accelerate.PartialState
    """This process's accelerate state on `device` (auto | cpu | cuda): which process of a launch it is. CPU
    processes of one launch meet over gloo.

    accelerate's state is process-wide and keeps the first run's device; in one process that is not part of a
    launch (the web UI, a notebook, the tests) each run's device is its own choice, so a mismatched state is reset.
    """
    from accelerate.state import AcceleratorState, PartialState

    if device == "cuda" and not torch.cuda.is_available():
        raise StudioError("--device cuda: no CUDA device is visible; use --device cpu (or auto)")
    cpu = device == "cpu" or not torch.cuda.is_available()
    if PartialState._shared_state and not torch.distributed.is_initialized():
        if (PartialState().device.type == "cpu") != cpu:
            AcceleratorState._reset_state(reset_partial_state=True)
    return PartialState(cpu=cpu)


def accelerator(device: str) -> Any:  # -> accelerate.Accelerator
    """The run's Accelerator on `device`, on the process state `process_state` set up."""
    from accelerate import Accelerator

    return Accelerator(cpu=process_state(device).device.type == "cpu")
