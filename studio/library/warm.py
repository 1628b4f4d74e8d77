"""Adapters kept warm between calls: injected once, set aside with their PEFT layers while nothing is loaded, and put
back in a moment when a later call names them.

Injection is most of a load: PEFT builds a module per adapted layer, about 0.2 s per adapter on studio-tiny (a
quarter of a 20-step image on two CPU cores; on a GPU more than the image itself). `<lora:...>` tags and composers
load adapters for one call, so the studio keeps them (`studio.library.load.release_adapters`). Between calls the
PEFT layers are taken out of the model and the base modules put back, so a plain generation runs the base modules
themselves: inactive PEFT layers left in place cost a plain studio-tiny image 20% on two CPU cores (Python forward
calls). Putting the layers back checks that each base module is still the one at its path, on the same device and
dtype.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from peft.tuners.tuners_utils import BaseTunerLayer

from studio.library.meta import COMPONENTS


_PEFT_ATTRS = ("peft_config", "_hf_peft_config_loaded")


def stamp(folder: Path) -> tuple:
    """Which files an entry was loaded from, and when they were last written."""
    from studio.library.store import _stamp as file_stamp

    return (str(folder.resolve()), *file_stamp(folder))


@dataclass
class Warm:
    """One pipeline's warm adapters (name -> (stamp, PEFT type), oldest first) and, while set aside, their layers."""

    adapters: OrderedDict[str, tuple] = field(default_factory=OrderedDict)
    layers: dict[str, list[tuple[str, BaseTunerLayer]]] | None = None  # component -> (path, PEFT layer)
    attrs: dict[str, dict[str, Any]] = field(default_factory=dict)  # component -> PEFT's attributes on it

    def set_aside(self, pipe: Any) -> None:
        """Put every component's base modules back in place of its PEFT layers (which hold only warm adapters)."""
        self.layers, self.attrs = {}, {}
        for component, model in _models(pipe):
            held = tuner_children(model)
            for _, parent, attr, layer in held:
                setattr(parent, attr, layer.get_base_layer())
            self.layers[component] = [(path, layer) for path, _, _, layer in held]
            self.attrs[component] = {a: model.__dict__.pop(a) for a in _PEFT_ATTRS if a in model.__dict__}

    def put_back(self, pipe: Any) -> bool:
        """The PEFT layers in place again; False (and nothing changed) when a base module moved or was replaced."""
        if self.layers is None:
            return True
        models = dict(_models(pipe))
        found = {c: dict(models[c].named_modules()) if c in models else {} for c in self.layers}  # one walk each
        for component, held in self.layers.items():
            for path, layer in held:
                base = layer.get_base_layer()
                if found[component].get(path) is not base or not _same_place(layer, base):
                    return False
        for component, held in self.layers.items():
            for path, layer in held:
                parent_path, _, attr = path.rpartition(".")
                setattr(found[component][parent_path], attr, layer)
            models[component].__dict__.update(self.attrs.get(component, {}))
        self.layers, self.attrs = None, {}
        return True

    @property
    def aside(self) -> bool:
        return self.layers is not None


def _models(pipe: Any) -> list[tuple[str, torch.nn.Module]]:
    return [(c, m) for c in COMPONENTS if isinstance(m := getattr(pipe, c, None), torch.nn.Module)]


def tuner_children(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module, str, BaseTunerLayer]]:
    """Each PEFT layer of `model` as (path, parent, attribute, layer), in one walk: the parent is at hand to put
    another module in the layer's place (`setattr(parent, attribute, module)`)."""
    seen: dict[str, torch.nn.Module] = {}
    out = []
    for path, module in model.named_modules():  # parents come before their children
        seen[path] = module
        if isinstance(module, BaseTunerLayer):
            parent_path, _, attr = path.rpartition(".")
            out.append((path, seen[parent_path], attr, module))
    return out


def _same_place(layer: BaseTunerLayer, base: torch.nn.Module) -> bool:
    """Whether the adapters still sit on the base weights' device and dtype (as PEFT put them)."""
    weight = next(base.parameters(), None)
    adapter = next((p for a in layer.adapter_layer_names for p in getattr(layer, a).parameters()), None)
    return weight is None or adapter is None or (adapter.device, adapter.dtype) == (weight.device, weight.dtype)
