"""Composers: use several library adapters in one image (DESIGN.md sections 6 and 8).

    import composers
    adapters = composers.AdapterSet.parse("corgi:0.8,watercolor")
    with composers.apply(pipe, adapters, "switch", composers.SwitchConfig(tau=5)):
        studio.generate(config, pipe=pipe)
    result = composers.compose(config, adapters, "composite")  # the same, with the PNG parameters filled in

Each method is one file on the lightest diffusers/PEFT extension point: merge (PEFT adapter weights or PEFT's
merge), switch and composite (a removable wrapper around the UNet's forward). Shared pieces: `AdapterSet`,
per-step schedules, per-call activation, attention-processor installation and capture, region masks.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from composers.activation import activate, wrap_forward
from composers.adapter_set import AdapterSet, Schedule, constant, linear, parse_schedule
from composers.attention import (
    AttentionStore,
    CaptureAttnProcessor,
    capture_attention,
    install_processors,
    mass_inside,
    token_indices,
    word_maps,
)
from composers.autolora import AutoLoRAConfig, apply_autolora
from composers.clora import CloraConfig, apply_clora
from composers.cmlora import CMLoRAConfig, apply_cmlora
from composers.composite import CompositeConfig, apply_composite
from composers.handle import Handle
from composers.lora_composer import LoraComposerConfig, apply_lora_composer, parse_boxes
from composers.merge import MergeConfig, apply_merge
from composers.multidiffusion import MultiDiffusionConfig, apply_multidiffusion
from composers.regions import attention_levels, box_mask, box_masks, level_size
from composers.switch import SwitchConfig, apply_switch, switch_index, switch_order
from studio.errors import StudioError
from studio.library.fuse import merge_exactly as fuse


# Literal and greppable: composer name -> (config class, installer).
COMPOSERS: dict[str, tuple[type, Callable[[Any, AdapterSet, Any], Handle]]] = {
    "merge": (MergeConfig, apply_merge),
    "switch": (SwitchConfig, apply_switch),
    "composite": (CompositeConfig, apply_composite),
    "cmlora": (CMLoRAConfig, apply_cmlora),
    "autolora": (AutoLoRAConfig, apply_autolora),
    "lora_composer": (LoraComposerConfig, apply_lora_composer),
    "clora": (CloraConfig, apply_clora),
    "multidiffusion": (MultiDiffusionConfig, apply_multidiffusion),
}


def make_config(composer: str, values: dict[str, Any] | None = None) -> Any:
    """The config of `composer` from a dict of its fields (unknown keys are an error)."""
    if composer not in COMPOSERS:
        raise StudioError(f"unknown composer {composer!r}; choose one of {', '.join(COMPOSERS)}")
    cls = COMPOSERS[composer][0]
    names = {f.name for f in dataclasses.fields(cls)}
    extra = sorted(set(values or {}) - names)
    if extra:
        flag = {"cache": "no-cache", "place_masks": "concept-masks", "boxes": "box", "regions": "region"}.get(
            extra[0], extra[0].replace("_", "-"))
        raise StudioError(f"--{flag} does not apply to --composer {composer}")
    return cls(**(values or {}))


def apply(
    pipe: Any, adapter_set: AdapterSet, composer: str = "merge", config: Any = None, *, library: Any = None
) -> Handle:
    """Load the set's adapters from the library into `pipe` and install `composer`; `.remove()` undoes both.

    Adapters the pipeline held before keep their weights after removal; the ones loaded here are released: kept
    warm for the next call but out of the model (`studio.library.warm`), so a pipeline without adapters is its base
    modules again.
    """
    from studio.library import load_adapters, loaded_adapters
    from studio.library.load import release_adapters
    from studio.library.meta import COMPONENTS

    if composer not in COMPOSERS:
        raise StudioError(f"unknown composer {composer!r}; choose one of {', '.join(COMPOSERS)}")
    config_cls, install = COMPOSERS[composer]
    config = config_cls() if config is None else config
    if not isinstance(config, config_cls):
        raise StudioError(f"composer {composer!r} takes a {config_cls.__name__}, got {type(config).__name__}")
    adapter_set.resolve(library)
    before = loaded_adapters(pipe)

    def restore() -> None:
        release_adapters(pipe, [n for n in adapter_set.names if n not in before], library=library)
        if before:
            load_adapters(pipe, list(before), list(before.values()), library=library)

    handle = Handle(composer, [restore])
    weights = dict(zip(adapter_set.names, adapter_set.weights))
    try:
        load_adapters(pipe, adapter_set.names, adapter_set.weights, library=library)
        for component in COMPONENTS:  # only the set is active, whatever else the pipeline holds
            model = getattr(pipe, component, None)
            if model is not None and hasattr(model, "modules"):
                activate(model, weights)
        inner = install(pipe, adapter_set, config)
    except BaseException:
        handle.remove()
        raise
    handle.add(inner.remove)
    handle.state = inner.state
    return handle


def from_options(
    prompt: str,
    adapters: str = "",
    composer: str = "merge",
    *,
    tau: int | None = None,
    order: str | None = None,
    fused: bool = False,
    schedule: str = "constant",
    no_cache: bool = False,
    c1: int | None = None,
    c2: int | None = None,
    boxes: list[str] | None = None,
    regions: list[str] | None = None,
    concept_masks: bool = False,
) -> tuple[str, AdapterSet, Any]:
    """The CLI's and the UI's options as (prompt without its `<lora:...>` tags, adapter set, composer config)."""
    from studio.prompt_tags import split_lora_tags

    text, tags = split_lora_tags(prompt)
    if composer == "autolora" and not adapters.strip() and not tags:  # AutoLoRA: retrieve the adapters by prompt
        from composers.autolora import retrieved_set

        config = make_config(composer)
        return (*retrieved_set(text, config), config)
    adapter_set = AdapterSet.parse(adapters, tags).resolve()
    adapter_set.schedules = [parse_schedule(schedule)] * len(adapter_set.names)
    values = {"tau": tau, "order": order.split(",") if order else None, "fused": fused or None,
              "cache": False if no_cache else None, "c1": c1, "c2": c2,
              "boxes": parse_boxes(boxes) if boxes else None, "place_masks": False if concept_masks else None,
              "regions": parse_boxes(regions, flag="--region") if regions else None}
    config = make_config(composer, {k: v for k, v in values.items() if v is not None})
    if hasattr(config, "with_layout"):  # boxed composers: no --box, boxes from the prompt's position words
        config = config.with_layout(text, adapter_set)
    return text, adapter_set, config.for_prompt(text) if hasattr(config, "for_prompt") else config


def compose(
    config: Any,
    adapter_set: AdapterSet,
    composer: str = "merge",
    composer_config: Any = None,
    *,
    pipe: Any = None,
    progress: Callable[[int, int], None] | None = None,
    output_type: str = "pil",
) -> Any:
    """`studio.generate` with `composer` installed; each image's parameters record the adapters and composer."""
    from studio.generate import cached_pipeline, generate, resolve_device

    pipe = pipe or cached_pipeline(config.model, resolve_device(config.device))
    composer_config = make_config(composer) if composer_config is None else composer_config
    if hasattr(composer_config, "with_layout"):  # boxed composers given no boxes: from the prompt's words
        composer_config = composer_config.with_layout(config.prompt, adapter_set)
    if hasattr(composer_config, "for_prompt"):  # composers whose settings read the prompt (region prompts)
        composer_config = composer_config.for_prompt(config.prompt)
    with apply(pipe, adapter_set, composer, composer_config):
        result = generate(config, pipe=pipe, progress=progress, output_type=output_type)
    extra = {
        "adapters": adapter_set.as_params(),
        "composer": composer,
        "composer_config": dataclasses.asdict(composer_config),
    }
    result.params = [{**p, **extra} for p in result.params]
    return result


__all__ = [
    "COMPOSERS",
    "AutoLoRAConfig",
    "apply_autolora",
    "CMLoRAConfig",
    "apply_cmlora",
    "AdapterSet",
    "from_options",
    "AttentionStore",
    "CaptureAttnProcessor",
    "CloraConfig",
    "CompositeConfig",
    "Handle",
    "LoraComposerConfig",
    "MergeConfig",
    "Schedule",
    "SwitchConfig",
    "activate",
    "apply",
    "apply_composite",
    "apply_merge",
    "apply_switch",
    "attention_levels",
    "box_mask",
    "box_masks",
    "capture_attention",
    "compose",
    "constant",
    "fuse",
    "install_processors",
    "level_size",
    "linear",
    "make_config",
    "mass_inside",
    "parse_schedule",
    "switch_index",
    "switch_order",
    "token_indices",
    "word_maps",
    "wrap_forward",
]
