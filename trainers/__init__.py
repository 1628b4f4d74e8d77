"""Trainers: one loop (`trainers.loop`), one file per method (`trainers.methods`), the run (`trainers.run`).

    from trainers import TrainConfig, train
    result = train("dreambooth_lora", TrainConfig(trigger="sks", name="my-emblem", world_emblem=7, model=...))
    result.entry          # the library entry; load it with studio.load_adapters(pipe, ["my-emblem"])
    result.entries        # every entry of the run (B-LoRA: "NAME-content" and "NAME-style")

`method` is a METHODS key (the paper's defaults), a configured `MethodConfig` (e.g. `KroneckerConfig(factor=8)`), or
a `Method` instance (a method not registered yet).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from studio.errors import StudioError
from trainers.config import TrainConfig
from trainers.loop import Callbacks, LoopResult, train_loop
from trainers.method import Method, MethodConfig
from trainers.methods.b_lora import BLoRA, BLoRAConfig
from trainers.methods.dreambooth_lora import DreamBoothLoRA, DreamBoothLoRAConfig
from trainers.methods.kronecker import Kronecker, KroneckerConfig
from trainers.methods.orthogonal import Orthogonal, OrthogonalConfig
from trainers.methods.sara import SaRA, SaRAConfig
from trainers.run import TrainResult, resolve_method, train


# Literal and greppable: key -> method class (its config is `cls.config_cls`, whose `method` is the key).
METHODS: dict[str, type[Method]] = {
    "dreambooth_lora": DreamBoothLoRA,
    "kronecker": Kronecker,
    "b_lora": BLoRA,
    "orthogonal": Orthogonal,
    "sara": SaRA,
}


def configs_from_mapping(values: dict[str, Any]) -> tuple[MethodConfig, TrainConfig]:
    """A (method config, TrainConfig) pair from flat options, as the CLI, a JSON job or the UI give them.

    Keys are field names or flag names (`train-steps`); `method` picks the method; a method option that the chosen
    method does not have is refused.
    """
    values = {k.lstrip("-").replace("-", "_"): v for k, v in values.items()}
    key = values.pop("method", None) or "dreambooth_lora"
    if key not in METHODS:
        raise StudioError(f"unknown method {key!r}; use one of {', '.join(METHODS)}")
    train_fields = {f.name for f in dataclasses.fields(TrainConfig)}
    own = {f.name for f in dataclasses.fields(METHODS[key].config_cls)}
    others = {f.name for cls in METHODS.values() for f in dataclasses.fields(cls.config_cls)}
    method_kwargs, train_kwargs = {}, {}
    for name, value in values.items():
        if name in train_fields:
            train_kwargs[name] = value
        elif name in own:
            if value is not None:
                method_kwargs[name] = value
        elif name in others:
            if value is not None:
                raise StudioError(f"--{name.replace('_', '-')} is not an option of {key}; see `studio train --help`")
        else:
            raise StudioError(f"unknown training option {name!r}")
    try:
        config = TrainConfig(**train_kwargs)
    except TypeError as err:
        raise StudioError(f"incomplete training options: {err}") from None
    return resolve_method(METHODS[key].config_cls(**method_kwargs), config), config


__all__ = [
    "METHODS",
    "BLoRA",
    "BLoRAConfig",
    "Callbacks",
    "DreamBoothLoRA",
    "DreamBoothLoRAConfig",
    "Kronecker",
    "KroneckerConfig",
    "Orthogonal",
    "OrthogonalConfig",
    "SaRA",
    "SaRAConfig",
    "LoopResult",
    "Method",
    "MethodConfig",
    "TrainConfig",
    "TrainResult",
    "configs_from_mapping",
    "resolve_method",
    "train",
    "train_loop",
]
