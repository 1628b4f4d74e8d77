"""Sparse-delta adapters (SaRA, trainers/methods/sara.py): named flat indices and values added to base parameters.

Format (peft_type `SPARSE`): for each changed parameter `<component>.<module>.<weight|bias>`, the safetensors file
holds `<param>.indices` (int32, the strictly increasing flat positions in the parameter) and `<param>.values`
(float, the change dP at them), so W = W0 + weight * scatter(indices, values). `studio.json` keeps each parameter's
shape under `sparse.shapes` (and the trainer's threshold); `adapter_config.json` lists the parameters.

In a pipeline the delta is added to the base tensors in place (no cost per step); the first values of every entry
touched are kept, and each change of the set of sparse adapters or their weights restores them and adds the active
deltas again, so unloading gives the base back bit for bit. `to_dense` / `from_dense` convert to full-shape deltas
for merges and `write_diff` exports them as one plain safetensors of full-weight differences for other tools.
"""

from __future__ import annotations

import json
import re
import weakref
from pathlib import Path
from typing import Any

import torch

from studio import atomic
from studio.errors import StudioError


PEFT_TYPE = "SPARSE"
INDICES, VALUES = "indices", "values"
PARAMS = (f"weight.{INDICES}", f"weight.{VALUES}", f"bias.{INDICES}", f"bias.{VALUES}")
_KEY = re.compile(rf"^(.+)\.({INDICES}|{VALUES})$")

# pipe -> {"adapters": {name: {param: (indices, values)}}, "weights": {name: w}, "pristine": {param: (idx, vals)}}
_APPLIED: weakref.WeakKeyDictionary[Any, dict[str, Any]] = weakref.WeakKeyDictionary()


def by_param(state_dict: dict[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """`<component>.<module>.<weight|bias>` -> (indices, values); a key that is neither is refused."""
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state_dict.items():
        m = _KEY.match(key)
        if not m:
            raise StudioError(f"tensor {key!r} is not a sparse-delta key (<param>.indices / <param>.values)")
        parts.setdefault(m.group(1), {})[m.group(2)] = tensor
    out = {}
    for param, pair in parts.items():
        if set(pair) != {INDICES, VALUES}:
            raise StudioError(f"parameter {param!r} needs both .indices and .values")
        out[param] = (pair[INDICES], pair[VALUES])
    return out


def validate(state_dict: dict[str, torch.Tensor], shapes: dict[str, list[int]] | None = None) -> None:
    """Refuse a sparse delta whose tensors do not fit: 1-D integer indices, strictly increasing and inside the
    parameter (when its shape is known), finite floating values of the same length."""
    for param, (index, values) in by_param(state_dict).items():
        if index.dtype not in (torch.int32, torch.int64) or index.dim() != 1:
            raise StudioError(f"parameter {param!r}: indices must be a 1-D int32/int64 tensor")
        if not values.is_floating_point() or values.shape != index.shape:
            raise StudioError(f"parameter {param!r}: values must be floating point and as long as its indices")
        if index.numel() == 0:
            raise StudioError(f"parameter {param!r}: no entries")
        if not torch.isfinite(values).all():
            raise StudioError(f"parameter {param!r}: values hold NaN or infinite numbers; the adapter is damaged")
        if index[0] < 0 or (index.numel() > 1 and not bool((index[1:] > index[:-1]).all())):
            raise StudioError(f"parameter {param!r}: indices must be non-negative and strictly increasing")
        if shapes is not None:
            if param not in shapes:
                raise StudioError(f"parameter {param!r} has no shape in the adapter's sparse.shapes")
            if int(index[-1]) >= torch.Size(shapes[param]).numel():
                raise StudioError(f"parameter {param!r}: index {int(index[-1])} is outside its shape {shapes[param]}")


def to_dense(index: torch.Tensor, values: torch.Tensor, shape: list[int]) -> torch.Tensor:
    """The full-shape float32 delta of one parameter."""
    dense = torch.zeros(torch.Size(shape).numel())
    return dense.index_put_((index.long(),), values.float()).view(shape)


def from_dense(deltas: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, list[int]]]:
    """Sparse tensors (the non-zero entries) and shapes of full-shape deltas; all-zero parameters are left out."""
    tensors, shapes = {}, {}
    for param, delta in deltas.items():
        flat = delta.reshape(-1)
        index = flat.nonzero().view(-1)  # (n,) increasing
        if index.numel():
            tensors[f"{param}.{INDICES}"], tensors[f"{param}.{VALUES}"] = index.to(torch.int32), flat[index].float()
            shapes[param] = list(delta.shape)
    return tensors, shapes


def modules(state_dict: dict[str, torch.Tensor]) -> list[str]:
    return list(dict.fromkeys(p.rsplit(".", 1)[0] for p in by_param(state_dict)))


# -- in a pipeline ---------------------------------------------------------------------------------------------------
def _tensor(pipe: Any, param: str) -> torch.Tensor:
    """The base tensor `param` names in `pipe` (under a PEFT wrapper, its base layer's)."""
    component, rest = param.split(".", 1)
    path, _, attr = rest.rpartition(".")
    model = getattr(pipe, component, None)
    try:
        module = model.get_submodule(path)
    except (AttributeError, TypeError):
        raise StudioError(f"the pipeline has no module {component}.{path}; load the adapter on its own base") from None
    module = getattr(module, "base_layer", module)
    tensor = getattr(module, attr, None)
    if not isinstance(tensor, torch.Tensor):
        raise StudioError(f"the pipeline's {component}.{path} has no {attr}; load the adapter on its own base")
    return tensor


def mismatch(pipe: Any, name: str, shapes: dict[str, list[int]]) -> str | None:
    """Why the sparse adapter `name` does not fit `pipe` (first parameter missing or of another shape), or None."""
    for param, shape in shapes.items():
        try:
            have = list(_tensor(pipe, param).shape)
        except StudioError as err:
            return f"adapter {name!r} does not fit this pipeline: {err}"
        if have != list(shape):
            return (f"adapter {name!r} does not fit this pipeline: {param} has shape {have}, the adapter expects "
                    f"{list(shape)}; load it on a matching model")
    return None


def _restore(pipe: Any, state: dict[str, Any]) -> None:
    with torch.no_grad():
        for param, (index, pristine) in state["pristine"].items():
            flat = _tensor(pipe, param).view(-1)
            flat.index_copy_(0, index.to(flat.device), pristine.to(flat.device))


def _apply(pipe: Any, state: dict[str, Any]) -> None:
    with torch.no_grad():
        for name, weight in state["weights"].items():
            for param, (index, values) in state["adapters"][name].items():
                flat = _tensor(pipe, param).view(-1)
                flat.index_add_(0, index.to(flat.device), (weight * values).to(flat.device, flat.dtype))


def inject(pipe: Any, name: str, state_dict: dict[str, torch.Tensor]) -> None:
    """Add adapter `name` to the pipeline at weight 0 (`set_weights` weights it); the entries it touches keep their
    first values for an exact restore."""
    state = _APPLIED.setdefault(pipe, {"adapters": {}, "weights": {}, "pristine": {}})
    params = {p: (i.long(), v.float()) for p, (i, v) in by_param(state_dict).items()}
    for param in params:
        _tensor(pipe, param)  # every parameter exists before anything changes
    _restore(pipe, state)
    with torch.no_grad():
        for param, (index, _) in params.items():
            flat = _tensor(pipe, param).view(-1)
            known = state["pristine"].get(param)
            union = index if known is None else torch.unique(torch.cat([known[0], index]))  # (n,) sorted
            state["pristine"][param] = (union, flat[union.to(flat.device)].clone())
    state["adapters"][name] = params
    _apply(pipe, state)


def loaded(pipe: Any) -> list[str]:
    return list(_APPLIED.get(pipe, {}).get("adapters", {}))


def set_weights(pipe: Any, weights: dict[str, float]) -> None:
    """The sparse adapters of `weights` active at their weights (the others at 0): the base entries restored, then
    W += weight * delta for each."""
    state = _APPLIED.get(pipe)
    if not state:
        return
    _restore(pipe, state)
    state["weights"] = {n: float(w) for n, w in weights.items() if n in state["adapters"]}
    _apply(pipe, state)


def remove(pipe: Any, names: list[str]) -> None:
    """Take adapters out; with none left every touched entry holds its first value again, exactly."""
    state = _APPLIED.get(pipe)
    if not state:
        return
    _restore(pipe, state)
    for name in names:
        state["adapters"].pop(name, None)
        state["weights"].pop(name, None)
    if not state["adapters"]:
        del _APPLIED[pipe]
        return
    _apply(pipe, state)


# -- a plain diff of full weights ------------------------------------------------------------------------------------
def write_diff(name: str, deltas: dict[str, torch.Tensor], meta: Any, out: Path) -> Path:
    """One safetensors file: `<component>.<module>.<weight|bias>` -> the full-shape delta, so that another tool adds
    `weight * diff[key]` to the base's tensor of that name (component prefix stripped). `out` may be a folder."""
    from safetensors.torch import save

    out = Path(out)
    if out.is_dir() or not out.suffix:
        out = out / f"{name}-diff.safetensors"
    metadata = {"format": "pt", "studio.kind": "full-weight-diff", "studio.method": meta.method,
                "studio.base_family": meta.base.family, "studio.base_checkpoint": meta.base.checkpoint,
                "studio.usage": "W = W0 + weight * diff[name]; names are <component>.<parameter>",
                "studio.trigger_words": json.dumps(meta.trigger_words)}
    tensors = {k: v.float().contiguous() for k, v in deltas.items()}
    atomic.write_bytes(out, save(tensors, metadata=metadata))
    return out
