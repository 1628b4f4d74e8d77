"""Does an adapter fit a pipeline? Architecture (module names and shapes) must match; the checkpoint may differ.

- `fingerprint`: sha256 over the adapted modules' `name:shape` lines of the base (16 hex digits).
- `checkpoint_hash`: sha256 over every UNet / text-encoder tensor's name, shape and a sample of its values (the
  first and last 4,096, in float32), cached per pipeline: cheap on SDXL, and any fine-tune changes it.
Architecture mismatches raise a StudioError naming the first mismatched module; a checkpoint mismatch warns.
"""

from __future__ import annotations

import hashlib
import warnings
import weakref
from dataclasses import dataclass
from typing import Any

import torch

from studio.errors import StudioError
from studio.library.meta import COMPONENTS, AdapterMeta, BaseInfo, is_embedding, modules_of, split_key


_CHECKPOINT_CACHE: weakref.WeakKeyDictionary[Any, str] = weakref.WeakKeyDictionary()


class CheckpointMismatchWarning(UserWarning):
    """The adapter was made on another checkpoint of the same architecture."""


def family_of(pipe: Any) -> str:
    unet = getattr(pipe, "unet", None)
    if unet is None:
        return "unknown"
    if getattr(pipe, "text_encoder_2", None) is not None or unet.config.get("addition_embed_type") == "text_time":
        return "sdxl"
    if unet.config.get("use_linear_projection") or unet.config.get("prediction_type") == "v_prediction":
        return "sd2"
    return "sd1"


def base_shapes(pipe: Any, modules: list[str]) -> dict[str, tuple[int, ...] | None]:
    """`<component>.<module>` -> the base weight shape in `pipe`, or None when the module is missing."""
    out: dict[str, tuple[int, ...] | None] = {}
    cache: dict[str, dict[str, torch.nn.Module]] = {}
    for full in modules:
        component, name = full.split(".", 1)
        if component not in cache:
            model = getattr(pipe, component, None)
            cache[component] = dict(model.named_modules()) if isinstance(model, torch.nn.Module) else {}
        module = cache[component].get(name)
        base = getattr(module, "base_layer", module)  # a module already wrapped by PEFT
        weight = getattr(base, "weight", None)
        out[full] = tuple(weight.shape) if isinstance(weight, torch.Tensor) else None
    return out


def fingerprint(shapes: dict[str, tuple[int, ...] | None]) -> str:
    text = "\n".join(f"{name}:{list(shape) if shape else None}" for name, shape in sorted(shapes.items()))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def checkpoint_hash(pipe: Any) -> str:
    try:
        return _CHECKPOINT_CACHE[pipe]
    except (KeyError, TypeError):
        pass
    h = hashlib.sha256()
    for component in COMPONENTS:
        model = getattr(pipe, component, None)
        if not isinstance(model, torch.nn.Module):
            continue
        for name, tensor in sorted(model.state_dict().items()):
            if "lora_" in name or "lokr_" in name:
                continue
            name = name.replace(".base_layer.", ".")
            flat = tensor.detach().reshape(-1)
            sample = torch.cat([flat[:4096], flat[-4096:]]).to("cpu", torch.float32)
            h.update(f"{component}.{name}:{list(tensor.shape)}".encode())
            h.update(sample.numpy().tobytes())
    digest = h.hexdigest()[:16]
    try:
        _CHECKPOINT_CACHE[pipe] = digest
    except TypeError:
        pass
    return digest


def base_info(pipe: Any, modules: list[str], name: str = "") -> BaseInfo:
    """What to store as an adapter's base when it is made on (or checked against) `pipe`."""
    unet = getattr(pipe, "unet", None)
    return BaseInfo(
        family=family_of(pipe),
        name=name or str(getattr(getattr(pipe, "config", None), "_name_or_path", "") or ""),
        fingerprint=fingerprint(base_shapes(pipe, modules)),
        checkpoint=checkpoint_hash(pipe),
        layers_per_block=int(unet.config.layers_per_block) if unet is not None else 2,
    )


def expected_shapes(meta: AdapterMeta, state_dict: dict[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    """The base weight shape each adapted module implies (LoKr: `(out, in * kernel)`, compared flattened; a sparse
    delta: the weight shapes it declares)."""
    out: dict[str, tuple[int, ...]] = {}
    if meta.peft_type == "SPARSE":
        shapes = meta.sparse.get("shapes", {})
        return {p.removesuffix(".weight"): tuple(s) for p, s in shapes.items() if p.endswith(".weight")}
    for full in modules_of(state_dict):
        if meta.peft_type == "LORA":
            a, b = state_dict[f"{full}.lora_A.weight"], state_dict[f"{full}.lora_B.weight"]
            out[full] = (a.shape[1], b.shape[0]) if is_embedding(full) else (b.shape[0], *a.shape[1:])
        else:
            w1 = state_dict.get(f"{full}.lokr_w1")
            if w1 is None:
                w1 = state_dict[f"{full}.lokr_w1_a"] @ state_dict[f"{full}.lokr_w1_b"]
            if f"{full}.lokr_w2" in state_dict:
                w2_out, w2_in = state_dict[f"{full}.lokr_w2"].shape[0], state_dict[f"{full}.lokr_w2"][0].numel()
            elif f"{full}.lokr_t2" in state_dict:
                t2 = state_dict[f"{full}.lokr_t2"]
                w2_out = state_dict[f"{full}.lokr_w2_a"].shape[1]
                w2_in = state_dict[f"{full}.lokr_w2_b"].shape[1] * t2[0, 0].numel()
            else:
                w2_out, w2_in = state_dict[f"{full}.lokr_w2_a"].shape[0], state_dict[f"{full}.lokr_w2_b"].shape[1]
            out[full] = (w1.shape[0] * w2_out, w1.shape[1] * w2_in)
    return out


def align_names(
    pipe: Any, state_dict: dict[str, torch.Tensor], meta: AdapterMeta
) -> tuple[dict[str, torch.Tensor], AdapterMeta]:
    """Add or drop the `text_model.` root of text-encoder modules to match the pipeline's CLIP classes."""
    renames: dict[str, str] = {}
    names: dict[str, set[str]] = {}
    for full in modules_of(state_dict):
        component, module = full.split(".", 1)
        if not component.startswith("text_encoder"):
            continue
        if component not in names:
            model = getattr(pipe, component, None)
            names[component] = {n for n, _ in model.named_modules()} if isinstance(model, torch.nn.Module) else set()
        if module in names[component]:
            continue
        other = module.removeprefix("text_model.") if module.startswith("text_model.") else f"text_model.{module}"
        if other in names[component]:
            renames[full] = f"{component}.{other}"
    if not renames:
        return state_dict, meta
    import copy

    def rename(full: str) -> str:
        return renames.get(full, full)

    new_sd = {}
    for key, value in state_dict.items():
        component, module, _ = split_key(key)
        head = f"{component}.{module}"
        new_sd[rename(head) + key[len(head) :]] = value
    meta = copy.deepcopy(meta)
    meta.alphas = {rename(k): v for k, v in meta.alphas.items()}
    meta.ranks = {rename(k): v for k, v in meta.ranks.items()}
    if meta.sparse.get("shapes"):
        meta.sparse["shapes"] = {rename(k.rsplit(".", 1)[0]) + "." + k.rsplit(".", 1)[1]: v
                                 for k, v in meta.sparse["shapes"].items()}
    return new_sd, meta


def _mismatch(
    name: str, meta: AdapterMeta, expected: dict[str, tuple[int, ...]], actual: dict[str, tuple[int, ...] | None]
) -> str | None:
    """Why an adapter expecting `expected` base shapes does not fit a base with `actual` ones; None when it fits."""
    for module, shape in expected.items():
        have = actual.get(module)
        if have is None:
            return (
                f"adapter {name!r} does not fit this pipeline: module {module} is missing (adapter base: "
                f"{meta.base.family}); load it on a {meta.base.family} model"
            )
        fits = have == shape if meta.peft_type != "LOKR" else (have[0], int(torch.Size(have[1:]).numel())) == shape
        if not fits:
            return (
                f"adapter {name!r} does not fit this pipeline: module {module} has shape {list(have)}, the adapter "
                f"expects {list(shape)} (adapter base: {meta.base.family}); load it on a matching model"
            )
    return None


def check_compatible(pipe: Any, name: str, meta: AdapterMeta, state_dict: dict[str, torch.Tensor]) -> None:
    """Refuse an architecture mismatch (naming the first module); warn on another checkpoint of it."""
    if meta.peft_type == "SPARSE":  # every parameter it touches, weights, biases and norms
        from studio.library.sparse import mismatch

        problem = mismatch(pipe, name, meta.sparse.get("shapes", {}))
    else:
        expected = expected_shapes(meta, state_dict)
        problem = _mismatch(name, meta, expected, base_shapes(pipe, list(expected)))
    if problem:
        raise StudioError(problem)
    if meta.base.checkpoint and meta.base.checkpoint != checkpoint_hash(pipe):
        warnings.warn(
            f"adapter {name!r} was made on another checkpoint ({meta.base.name or meta.base.checkpoint}) of this "
            "architecture; it will load, but results may differ",
            CheckpointMismatchWarning,
            stacklevel=3,
        )


@dataclass
class BaseSignature:
    """What compatibility needs of a base, kept without the pipeline: every weight's shape and the checkpoint hash."""

    name: str
    family: str
    shapes: dict[str, tuple[int, ...]]  # "<component>.<module>" -> base weight shape
    checkpoint: str


def base_signature(pipe: Any, name: str = "") -> BaseSignature:
    """The signature of a loaded pipeline (read once; checking many adapters against it needs no pipeline)."""
    shapes: dict[str, tuple[int, ...]] = {}
    for component in COMPONENTS:
        model = getattr(pipe, component, None)
        if not isinstance(model, torch.nn.Module):
            continue
        for module_name, module in model.named_modules():
            base = getattr(module, "base_layer", module)  # a module already wrapped by PEFT
            weight = getattr(base, "weight", None)
            if isinstance(weight, torch.Tensor) and ".base_layer" not in module_name:
                shapes[f"{component}.{module_name}"] = tuple(weight.shape)
    return BaseSignature(name, family_of(pipe), shapes, checkpoint_hash(pipe))


@dataclass
class Fit:
    """How an adapter fits a base: "fits", "other-checkpoint" (loads, with a warning) or "no" (refused)."""

    level: str
    reason: str = ""

    @property
    def badge(self) -> str:
        return {"fits": "✓ fits", "other-checkpoint": "~ other checkpoint", "no": "✗ does not fit"}[self.level]


def fit(entry: Any, signature: BaseSignature) -> Fit:
    """Does library `entry` (a `studio.library.Entry`) load on the base of `signature`? As `load_adapters` decides:
    the architecture must match (by the stored fingerprint, or the tensors' shapes when none was stored)."""
    meta, modules = entry.meta, entry.modules
    if meta.base.fingerprint:
        mine = fingerprint({m: signature.shapes.get(m) for m in modules})
        problem = None if mine == meta.base.fingerprint else (
            f"made for another architecture ({meta.base.family}{f', {meta.base.name}' if meta.base.name else ''})"
        )
    else:  # an import without base information: compare the tensors' shapes
        problem = _mismatch(entry.name, meta, expected_shapes(meta, entry.state_dict()), signature.shapes)
    if problem:
        return Fit("no", problem)
    if meta.base.checkpoint and meta.base.checkpoint != signature.checkpoint:
        return Fit("other-checkpoint", f"made on another checkpoint ({meta.base.name or meta.base.checkpoint})")
    return Fit("fits", f"made for {signature.name or signature.family}")
