"""Load library adapters into any diffusers SD1/SD2/SDXL pipeline, weight them, and unload them exactly.

LoRA and LoKr both go through PEFT's own injection (`inject_adapter_in_model` + `set_peft_model_state_dict`):
diffusers' `load_lora_weights` cannot read LoKr, and one path for both keeps weighting uniform. Adapters stay
unmerged (`y = base(x) + scale * delta(x)`); unloading puts the original base modules back, so the base output is
restored exactly. Sparse deltas (SaRA) are added to the base tensors in place by `studio.library.sparse`, which
keeps the entries' first values and puts them back on unload.

Adapters loaded for one call (`<lora:...>` tags, composers) are released, not unloaded: kept warm, at most `WARM`
per pipeline, least recently used first out, and taken up again without injection while their files are unchanged
(`studio.library.warm`). `unload_adapters()` with no names, and `forget_warm`, unload them for good.
"""

from __future__ import annotations

import functools
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
from studio.library.warm import Warm, stamp


_LOADED: weakref.WeakKeyDictionary[Any, dict[str, float]] = weakref.WeakKeyDictionary()
_WARM: weakref.WeakKeyDictionary[Any, Warm] = weakref.WeakKeyDictionary()
WARM = 4  # released adapters kept per pipeline


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
        if isinstance(model, torch.nn.Module):
            activate_in(model, weights)


def activate_in(model: torch.nn.Module, weights: dict[str, float]) -> None:
    """Make exactly the adapters in `weights` active in `model`'s PEFT layers, each at its weight (PEFT's
    `set_adapter` and `set_scale`). A layer whose active set is already right keeps it: PEFT's switch also sets
    every adapter's `requires_grad`, most of the cost on a UNet of a few hundred layers."""
    for _, layer in _tuner_layers(model):
        present = [n for n in weights if any(n in getattr(layer, a) for a in layer.adapter_layer_names)]
        if list(layer.active_adapters) != present:
            layer.set_adapter(present, inference_mode=True) if _accepts_inference(layer) else layer.set_adapter(
                present
            )
        for n in present:
            layer.set_scale(n, float(weights[n]))


def _accepts_inference(layer: BaseTunerLayer) -> bool:
    return _set_adapter_takes_inference(type(layer))


@functools.cache
def _set_adapter_takes_inference(cls: type) -> bool:
    import inspect

    return "inference_mode" in inspect.signature(cls.set_adapter).parameters


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
    try:
        _load(pipe, names, library)
    finally:
        loaded = _LOADED.setdefault(pipe, {})
        loaded.update({n: w for n, w in zip(names, weights) if n in loaded})
        set_weights(pipe, loaded)
        sparse.set_weights(pipe, loaded)
        _settle(pipe)
    return dict(loaded)


def _load(pipe: Any, names: list[str], library: Library) -> None:
    loaded, warm = _LOADED.setdefault(pipe, {}), _WARM.setdefault(pipe, Warm())
    if not warm.put_back(pipe):  # a base module was replaced or moved meanwhile: the warm layers are stale
        _WARM[pipe] = warm = Warm()
    for name in names:
        if name in loaded:
            continue
        if name in warm.adapters:
            kept, _ = warm.adapters.pop(name)
            if kept == stamp(library.root / name):
                loaded[name] = 1.0  # still injected: taken up again as it is
                continue
            _unload(pipe, [name])  # its files changed since: loaded afresh
        entry = library.get(name)
        state_dict, meta = align_names(pipe, entry.state_dict(), entry.meta)
        check_compatible(pipe, name, meta, state_dict)
        other = [n for n, (_, kind) in warm.adapters.items() if kind != meta.peft_type != sparse.PEFT_TYPE]
        if other:  # PEFT stacks adapters of one type on a layer: warm ones of another type go
            _unload(pipe, other)
        try:
            if meta.peft_type == sparse.PEFT_TYPE:
                sparse.inject(pipe, name, state_dict)
            else:
                inject(pipe, name, state_dict, meta)
        except Exception as err:  # PEFT refused part-way (a layout it builds otherwise): take the half-adapter out
            _unload(pipe, [name])
            if isinstance(err, StudioError):
                raise
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise StudioError(f"adapter {name!r} does not load into this pipeline ({first}); re-import it from its "
                              "original file") from None
        loaded[name] = 1.0


def loaded_adapters(pipe: Any) -> dict[str, float]:
    return dict(_LOADED.get(pipe, {}))


def release_adapters(pipe: Any, names: Sequence[str], *, library: Library | None = None) -> None:
    """Take `names` out of the active set as `unload_adapters` does, but keep PEFT adapters warm for a later
    `load_adapters` of the same files (module docstring); sparse ones, whose deltas sit in the base weights, are
    unloaded."""
    library = library or Library()
    loaded, warm = _LOADED.setdefault(pipe, {}), _WARM.setdefault(pipe, Warm())
    names = [n for n in names if n in loaded]
    kinds = _peft_types(pipe, names)
    if len(kinds) < len(names):
        _unload(pipe, [n for n in names if n not in kinds])
    for name, kind in kinds.items():
        loaded.pop(name)
        warm.adapters[name] = (stamp(library.root / name), kind)
        warm.adapters.move_to_end(name)
    if len(warm.adapters) > WARM:
        _unload(pipe, list(warm.adapters)[: len(warm.adapters) - WARM])
    if loaded or not warm.adapters:
        set_weights(pipe, loaded)
    # else every PEFT layer goes aside as it is: `load_adapters` sets the weights again when it puts them back
    _settle(pipe)


def forget_warm(pipe: Any | None = None) -> None:
    """Unload the warm adapters of `pipe` (default: of every pipeline), to free their memory."""
    for each in [pipe] if pipe is not None else list(_WARM):
        warm = _WARM.get(each)
        if warm is None:
            continue
        if warm.aside:
            _WARM[each] = Warm()  # their layers are out of the model: dropped with them
        else:
            unload_adapters(each, list(warm.adapters))


def _settle(pipe: Any) -> None:
    """With nothing loaded, the warm adapters' layers go aside and the base modules are back in place."""
    warm = _WARM.get(pipe)
    if warm is not None and warm.adapters and not warm.aside and not _LOADED.get(pipe):
        warm.set_aside(pipe)


def _peft_types(pipe: Any, names: Sequence[str]) -> dict[str, str]:
    """"LORA" or "LOKR" for each of `names` that is a PEFT adapter in the pipeline (not the sparse ones)."""
    out: dict[str, str] = {}
    for component in COMPONENTS:
        model = getattr(pipe, component, None)
        for layer in model.modules() if isinstance(model, torch.nn.Module) else []:
            if len(out) == len(names):
                return out  # one walk, cut short once all are found
            if isinstance(layer, BaseTunerLayer):
                for name in names:
                    if name in getattr(layer, "lora_A", {}):
                        out[name] = "LORA"
                    elif any(name in getattr(layer, a) for a in layer.adapter_layer_names):
                        out[name] = "LOKR"
    return out


def unload_adapters(pipe: Any, names: Sequence[str] | None = None) -> None:
    """Remove adapters (default: all the studio loaded, and the warm ones); modules with no adapter left get their
    base back."""
    _unload(pipe, names)
    _settle(pipe)


def _unload(pipe: Any, names: Sequence[str] | None) -> None:
    loaded, warm = _LOADED.setdefault(pipe, {}), _WARM.setdefault(pipe, Warm())
    if warm.aside and (names is None or set(names) & set(warm.adapters)):
        _WARM[pipe] = warm = Warm()  # their layers are out of the model: dropped with them
    names = list(loaded) + list(warm.adapters) if names is None else list(names)
    for name in names:
        warm.adapters.pop(name, None)
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
