"""CMLoRA: frequency-ordered dominant/non-dominant weighting of per-adapter predictions, with non-uniform caching.

Zou, Shen, Bouganis, Zhao, "Cached Multi-LoRA Composition for Multi-Concept Image Generation", ICLR 2025
(arXiv:2502.04923). Like LoRA Composite (`composers.composite`), every adapter gives its own noise prediction at every
step (both CFG halves, adapter i alone at its weight), but:

1. Sequencing (§4.1): adapters are profiled in the Fourier domain (`composers.frequency`): ΔH_h > threshold puts an
   adapter in the high-frequency set H, the rest form L; each set is ranked by ΔH. The order is H then L.
2. Dominance (§4.2): one adapter dominates at a time. The dominant changes at each cache-refresh step, cycling over
   H; after the `late` fraction of the steps (the authors' step 120 of 200) the window of |H| adapters it cycles over
   moves one place down the order, so a low-frequency adapter takes a turn (when L is empty, H throughout).
   The prediction is `e = (1/N) sum_i w_i e_i` with `w_d = c w_nd` for the dominant and `w_nd = N / (c + N - 1)`
   for the others, c = N - 0.5 by default (the weights sum to N, so this is a weighted mean).
3. Non-uniform caching (§4.2, c1 = 2, c2 = 3): full UNet passes refresh a cache every c1 steps on the first 37.5%
   of the steps and the last 12.5%, every c2 in between. At a refresh step only the new dominant adapter runs the
   full UNet and re-records its deep features; the non-dominant adapters reuse the deep features from their own last
   full pass, running only the shallow branch (`composers.deep_cache`). An adapter with nothing recorded (the first
   step of a run) runs the full UNet.

With `cache=False` every adapter runs the full UNet every step and the weighting and dominance are unchanged, so the
two differ only by the reuse.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from composers.activation import activate, sample_of, step_of, with_sample, wrap_forward
from composers.adapter_set import AdapterSet
from composers.deep_cache import DeepFeatureCache
from composers.frequency import frequency_order, profile_adapters
from composers.handle import Handle
from studio.configs import check_numbers
from studio.errors import StudioError


@dataclass
class CMLoRAConfig:
    cache: bool = field(default=True, metadata={
        "help": "reuse non-dominant adapters' deep UNet features between refresh steps (off: full passes)"})
    c1: int = field(default=2, metadata={"help": "refresh interval on the first 37.5% and last 12.5% of steps"})
    c2: int = field(default=3, metadata={"help": "refresh interval on the middle 50% of steps"})
    order: list[str] | None = field(default=None, metadata={
        "help": "adapters in integration order, all taken as high-frequency; default: measured by Fourier profiling"})
    dominant: float | None = field(default=None, metadata={"help": "dominance coefficient c (default N - 0.5)"})
    late: float = field(default=0.6, metadata={"help": "fraction of the steps after which low-frequency adapters "
                                                      "take turns dominating (the authors' 120 of 200)"})
    threshold: float = field(default=0.0, metadata={"help": "ΔH above which an adapter is high-frequency"})
    cutoff: float = field(default=0.2, metadata={"help": "h: the high band starts at h times the largest radius"})
    profile_steps: int = field(default=10, metadata={"help": "sampling steps of each profiling image"})
    profile_seeds: int = field(default=2, metadata={"help": "seeds each adapter's ΔH is averaged over"})

    def __post_init__(self) -> None:
        check_numbers(self)
        if self.c1 < 1 or self.c2 < 1:
            raise StudioError(f"--c1 and --c2 must be at least 1, got {self.c1} and {self.c2}")
        if not 0.0 <= self.late <= 1.0 or not 0.0 < self.cutoff < 1.0:
            raise StudioError("late must be in [0, 1] and cutoff in (0, 1)")
        if self.dominant is not None and self.dominant <= 0:
            raise StudioError(f"the dominance coefficient must be positive, got {self.dominant}")
        if self.profile_steps < 1 or self.profile_seeds < 1:
            raise StudioError("profile_steps and profile_seeds must be at least 1")


def refresh_steps(total: int, c1: int = 2, c2: int = 3) -> list[int]:
    """0-based steps that refresh a cache: every c1 on [0, 0.375T), c2 on [0.375T, 0.875T), c1 on [0.875T, T)."""
    a, b = int(0.375 * total), int(0.875 * total)  # the non-uniform schedule of Zou et al. §4.2
    return sorted({*range(0, a, c1), *range(a, b, c2), *range(b, total, c1)})


def dominant_schedule(total: int, high: list[str], low: list[str], refresh: list[int], late: float) -> list[str]:
    """The dominant adapter at each 0-based step (the dominant changes at refresh steps, §4.2)."""
    order, out, turns = high + low, [], 0
    for step in range(total):
        turns += step in refresh
        window = order[1:1 + len(high)] if low and step > late * total else high  # a low-frequency adapter's turn
        out.append(window[(max(turns, 1) - 1) % len(window)])
    return out


def dominance_weights(n: int, c: float | None = None) -> tuple[float, float]:
    """(w_d, w_nd): `w_nd = N / (c + N - 1)`, `w_d = c w_nd`, c = N - 0.5 by default (Zou et al. §4.2)."""
    c = n - 0.5 if c is None else c
    w_nd = n / (c + n - 1)
    return c * w_nd, w_nd


@dataclass
class CMLoRAState:
    high: list[str]
    low: list[str]
    shift: dict[str, float]  # ΔH_h of each adapter (empty when the order was given)
    history: list[tuple[int, str, str, bool]] = field(default_factory=list)  # (step, adapter, full|cached, dominant)


def apply_cmlora(pipe: Any, adapters: AdapterSet, config: CMLoRAConfig) -> Handle:
    weights = dict(zip(adapters.names, adapters.weights))
    if config.order is not None:
        if sorted(config.order) != sorted(adapters.names):
            raise StudioError(f"--order {','.join(config.order)} must list each adapter once: "
                              f"{','.join(adapters.names)}")
        shift, high, low = {}, list(config.order), []
    else:
        shift = profile_adapters(pipe, weights, steps=config.profile_steps, seeds=config.profile_seeds,
                                 cutoff=config.cutoff)
        high, low = frequency_order(shift, config.threshold)
        from studio.library.meta import COMPONENTS

        for component in COMPONENTS:  # profiling activated one adapter at a time: the whole set again
            model = getattr(pipe, component, None)
            if model is not None and hasattr(model, "modules"):
                activate(model, weights)
    order = high + low
    state = CMLoRAState(high, low, shift)
    cache = DeepFeatureCache(pipe.unet) if config.cache else None
    w_d, w_nd = dominance_weights(len(order), config.dominant)
    plan: dict[int, tuple[list[int], list[str]]] = {}  # total steps -> (refresh steps, dominant per step)
    last: list[int] = []  # the step of the previous call

    def forward(original: Callable[..., Any], sample: torch.Tensor, timestep: Any, *args: Any, **kw: Any) -> Any:
        step, total = step_of(pipe.scheduler, timestep)
        if total not in plan:
            refresh = refresh_steps(total, config.c1, config.c2)
            plan[total] = (refresh, dominant_schedule(total, high, low, refresh, config.late))
        refresh, dominant = plan[total]
        if cache is not None and (not last or step <= last[-1]):
            cache.clear()  # a new run (steps only increase within one; img2img starts past 0): nothing recorded
        last[:] = [step]
        scales = adapters.weights_at(step, total)
        total_pred = None
        for name in order:
            activate(pipe.unet, {name: scales[name]})  # e_{theta'_i}: adapter i alone, at its weight
            is_dominant = name == dominant[step]
            full = cache is None or not cache.has(name, sample.shape) or (is_dominant and step in refresh)
            if cache is None:
                out = original(sample, timestep, *args, **kw)
            else:
                with cache.recording(name, sample.shape) if full else cache.replaying(name):
                    out = original(sample, timestep, *args, **kw)
            state.history.append((step, name, "full" if full else "cached", is_dominant))
            term = sample_of(out) * (w_d if is_dominant else w_nd)  # (2B, C, H, W): both CFG halves
            total_pred = term if total_pred is None else total_pred + term
        return with_sample(out, total_pred / len(order))  # e = (1/N) sum_i w_i e_i

    undo = [lambda: activate(pipe.unet, weights)]
    if cache is not None:
        undo.append(cache.remove)
    return Handle("cmlora", [*undo, wrap_forward(pipe.unet, forward)], state)
