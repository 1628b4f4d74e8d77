"""Load library adapters into any diffusers SD1/SD2/SDXL pipeline, weight them, and unload them exactly.

LoRA and LoKr both go through PEFT's own injection (`inject_adapter_in_model` + `set_peft_model_state_dict`):
diffusers' `load_lora_weights` cannot read LoKr, and one path for both keeps weighting uniform. Adapters stay
unmerged (`y = base(x) + scale * delta(x)`); unloading puts the original base modules back, so the base output is
restored exactly. Sparse deltas (SaRA) are added to the base tensors in place by `studio.library.sparse`, which
keeps the entries' first values and puts them back on unload.
"""

from __future__ import annotations

import warnings
import weakref
from collections.abc import Sequence
from typing import Any

import torch
from peft import inject_adapter_in_model, set_peft_model_state_dict
from peft.tuners.tuners_utils import BaseTunerLayer

from studio.configs import finite
from studio.errors import StudioError
from studio.library import sparse
from studio.library.compat import align_names, check_compatible
from studio.library.meta import COMPONENTS, AdapterMeta, component_configs, modules_of, peft_config, peft_key
from studio.library.store import Library


_LOADED: weakref.WeakKeyDictionary[Any, dict[str, float]] = weakref.WeakKeyDictionary()


def _tuner_layers(model: torch.nn.Module) -> list[tuple[str, BaseTunerLayer]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, BaseTunerLayer)]


def inject(pipe: Any, adapter_name: str, state_dict: dict[str, torch.Tensor], meta: AdapterMeta) -> None:
    """Attach one adapter (canonical tensors + meta) to the pipeline's components under `adapter_name`."""
    configs = component_configs(meta, modules_of(state_dict))
    for component, config in configs.items():
        model = getattr(pipe, component, None)
        if not isinstance(model, torch.nn.Module):
            raise StudioError(f"adapter {adapter_name!r} has {component} weights but the pipeline has no {component}")
        wanted = "lora_A" if meta.peft_type == "LORA" else "lokr_w1"
        for path, layer in _tuner_layers(model):
            if (
                path in config["target_modules"]
                and wanted not in layer.adapter_layer_names
                and not any(wanted.replace("w1", "w1_a") == a for a in layer.adapter_layer_names)
            ):
                raise StudioError(
                    f"cannot stack a {meta.peft_type} adapter on {component}.{path}, which already holds another "
                    f"adapter type; unload it first (unload_adapters) or merge the adapters"
                )
        prefix = f"{component}."
        sub = {peft_key(k[len(prefix) :]): v for k, v in state_dict.items() if k.startswith(prefix)}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # PEFT warns when a model already carries another adapter
            inject_adapter_in_model(peft_config(config), model, adapter_name=adapter_name)
            result = set_peft_model_state_dict(model, sub, adapter_name=adapter_name)
        unexpected = [k for k in getattr(result, "unexpected_keys", []) if adapter_name in k or "lora" in k]
        if unexpected:
            raise StudioError(f"adapter {adapter_name!r}: tensor {unexpected[0]} found no module in {component}")
        for _, layer in _tuner_layers(model):
            for attr in layer.adapter_layer_names:
                holder = getattr(layer, attr)
                if adapter_name in holder:
                    holder[adapter_name].requires_grad_(False)


def set_weights(pipe: Any, weights: dict[str, float]) -> None:
    """Activate exactly the adapters in `weights`, each scaled by its weight (scale = weight * alpha / r)."""
    for component in COMPONENTS:
        model = getattr(pipe, component, None)
        if not isinstance(model, torch.nn.Module):
            continue
        for _, layer in _tuner_layers(model):
            present = [n for n in weights if any(n in getattr(layer, a) for a in layer.adapter_layer_names)]
            layer.set_adapter(present, inference_mode=True) if _accepts_inference(layer) else layer.set_adapter(
                present
            )
            for n in present:
                layer.set_scale(n, float(weights[n]))


def _accepts_inference(layer: BaseTunerLayer) -> bool:
    import inspect

    return "inference_mode" in inspect.signature(layer.set_adapter).parameters


def load_adapters(
    pipe: Any,
    names: Sequence[str],
    weights: Sequence[float] | None = None,
    *,
    library: Library | None = None,
) -> dict[str, float]:
    """Load library adapters `names` into `pipe` with `weights` (default 1.0 each); returns the active set.

    Adapters already loaded are re-weighted, not reloaded. The architecture is checked first (a mismatch raises a
    StudioError naming the module); another checkpoint of the same architecture gives a warning.
    """
    names = list(names)
    weights = [1.0] * len(names) if weights is None else [float(finite(w, "an adapter weight")) for w in weights]
    if len(weights) != len(names):
        raise StudioError(f"got {len(names)} adapter names but {len(weights)} weights; give one weight per adapter")
    if len(set(names)) != len(names):
        raise StudioError("an adapter is named twice; give each adapter once with its weight")
    library = library or Library()
    loaded = _LOADED.setdefault(pipe, {})
    for name in names:
        if name in loaded:
            continue
        entry = library.get(name)
        state_dict, meta = align_names(pipe, entry.state_dict(), entry.meta)
        check_compatible(pipe, name, meta, state_dict)
        try:
            if meta.peft_type == sparse.PEFT_TYPE:
                sparse.inject(pipe, name, state_dict)
            else:
                inject(pipe, name, state_dict, meta)
        except Exception as err:  # PEFT refused part-way (a layout it builds otherwise): take the half-adapter out
            unload_adapters(pipe, [name])
            if isinstance(err, StudioError):
                raise
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise StudioError(f"adapter {name!r} does not load into this pipeline ({first}); re-import it from its "
                              "original file") from None
        loaded[name] = 1.0
    loaded.update(dict(zip(names, weights)))
    set_weights(pipe, loaded)
    sparse.set_weights(pipe, loaded)
    return dict(loaded)


def loaded_adapters(pipe: Any) -> dict[str, float]:
    return dict(_LOADED.get(pipe, {}))


def unload_adapters(pipe: Any, names: Sequence[str] | None = None) -> None:
    """Remove adapters (default: all the studio loaded); modules with no adapter left get their base back."""
    loaded = _LOADED.setdefault(pipe, {})
    names = list(loaded) if names is None else list(names)
    sparse.remove(pipe, names)
    for component in COMPONENTS:
        model = getattr(pipe, component, None)
        if not isinstance(model, torch.nn.Module):
            continue
        for path, layer in _tuner_layers(model):
            for name in names:
                for attr in (*layer.adapter_layer_names, *layer.other_param_names):
                    holder = getattr(layer, attr, None)
                    if isinstance(holder, dict | torch.nn.ModuleDict | torch.nn.ParameterDict) and name in holder:
                        del holder[name]
            if not any(len(getattr(layer, a)) for a in layer.adapter_layer_names):
                parent_path, _, child = path.rpartition(".")
                parent = model.get_submodule(parent_path) if parent_path else model
                setattr(parent, child, layer.get_base_layer())
        config = getattr(model, "peft_config", None)
        if isinstance(config, dict):
            for name in names:
                config.pop(name, None)
            if not config:
                try:
                    del model.peft_config
                except AttributeError:
                    pass
        if hasattr(model, "_hf_peft_config_loaded") and not getattr(model, "peft_config", None):
            model._hf_peft_config_loaded = False
    for name in names:
        loaded.pop(name, None)
    set_weights(pipe, loaded)
