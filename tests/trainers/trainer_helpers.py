"""Shared builders for the trainer tests: tiny pipelines, Shapes World data, quick TrainConfigs."""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import torch
from tiny_models import BUILDERS

from trainers import TrainConfig
from trainers.data import TrainData, emblem_data


torch.set_num_threads(1)


def tiny_pipe(kind: str = "sd1") -> Any:
    pipe = BUILDERS[kind]()
    pipe.set_progress_bar_config(disable=True)
    return pipe


@functools.lru_cache(maxsize=4)
def _emblem(n: int, resolution: int) -> TrainData:
    return emblem_data(3, "sks", resolution, n=n)


def emblem(n: int = 3, resolution: int = 32, sample_prompts: list[str] | None = None) -> TrainData:
    """Renders of emblem 3 with trigger `sks` (cached); no previews unless `sample_prompts` are given."""
    return dataclasses.replace(_emblem(n, resolution), sample_prompts=list(sample_prompts or []))


def quick(**overrides: Any) -> TrainConfig:
    """A TrainConfig for a few CPU steps: no progress bar, no previews unless asked."""
    base = {
        "trigger": "sks",
        "name": "test",
        "world_emblem": 3,
        "train_steps": 2,
        "sample_steps": 1,
        "save_every": 0,
        "progress": False,
        "batch_size": 1,  # the defaults (4 images per step, 20 renders) are the bench's recipe; tests stay small
        "world_images": 5,
        "prior_preservation": False,  # on by default for world emblems; the tests that want it ask for it
        "device": "cpu",  # explicit: the suite also runs where a GPU is visible
    }
    return TrainConfig(**{**base, **overrides})
