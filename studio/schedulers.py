"""Sampler names of the CLI and UI, mapped onto diffusers schedulers built from the model's own config; and the
regression target of anything trained on the model (adapters, AutoLoRA's gates) from that config.

Building from the pipeline's scheduler config keeps the model's beta schedule, `prediction_type`
(epsilon or v-prediction) and offsets; only the sampling algorithm changes.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
)
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from studio.errors import StudioError


SCHEDULERS: dict[str, tuple[type[SchedulerMixin], dict[str, object], str]] = {
    # name: (class, overrides, A1111 sampler name for the PNG parameters)
    "ddim": (DDIMScheduler, {}, "DDIM"),
    "dpm": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++", "use_karras_sigmas": False}, "DPM++ 2M"),
    "euler": (EulerDiscreteScheduler, {}, "Euler"),
    "euler_a": (EulerAncestralDiscreteScheduler, {}, "Euler a"),
    "dpmpp_2m_karras": (
        DPMSolverMultistepScheduler,
        {"algorithm_type": "dpmsolver++", "use_karras_sigmas": True},
        "DPM++ 2M Karras",
    ),
}
SAMPLER_NAMES = {a1111: name for name, (_, _, a1111) in SCHEDULERS.items()}


def make_scheduler(name: str, base_config: dict) -> SchedulerMixin:
    """A scheduler `name` (see SCHEDULERS) configured from `base_config` (the model's scheduler config)."""
    if name not in SCHEDULERS:
        raise StudioError(f"unknown scheduler {name!r}; choose one of {', '.join(SCHEDULERS)}")
    cls, overrides, _ = SCHEDULERS[name]
    config = dict(base_config)
    if cls is DDIMScheduler:
        # A DDPM-style config inherits clip_sample=True, wrong for latents (washed-out images).
        config["clip_sample"] = False
    return cls.from_config(config, **overrides)


def scheduler_name(scheduler: SchedulerMixin) -> str:
    """The studio name of a scheduler instance, or its class name when it is none of ours."""
    for name, (cls, overrides, _) in SCHEDULERS.items():
        if type(scheduler) is cls and all(scheduler.config.get(k) == v for k, v in overrides.items()):
            return name
    return type(scheduler).__name__


def training_target(scheduler: Any, latents: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """What the UNet learns to predict, from `scheduler.config.prediction_type`."""
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(latents, noise, t)  # v = sqrt(abar_t) eps - sqrt(1 - abar_t) z_0
    if kind == "sample":
        return latents
    raise StudioError(f"the model's scheduler predicts {kind!r}; training supports epsilon, v_prediction and sample")
