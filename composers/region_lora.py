"""Pieces shared by the spatial composers: one adapter's LoRA delta on demand, region-masked LoRA deltas on every
adapted UNet layer, per-token region masks at any resolution, and latents a composer changed mid-step.

- `lora_delta(layer, name, x)`: `(alpha / r) w B A x` of one adapter of a PEFT LoRA layer (Hu et al. 2021, Eq. 3),
  whatever is active, so a composer holds one pipeline and computes each concept's delta where it needs it
  (composers.md 2.3: LoRA-Composer's optimized branch computes `dW = up @ down` on the fly instead of N pipelines).
- `install_region_deltas`: forward hooks adding `sum_n M_n(p) delta_n(x)` at each spatial position p of a layer's
  output, `M_n` the box of concept n normalised by the number of boxes covering p (on the base layer itself where no
  adapter is active through PEFT). This is the per-token scale matrix S of DESIGN.md section 7
  (`y = x W^T + sum_k S[t, k] (x A_k^T) B_k^T`).
- `LatentEdit`: the pipeline steps its own `latents`; a composer that updates them inside the UNet call (latent
  guidance, re-initialisation) hands the new latents to the scheduler's next `step`, which starts from them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.nn.functional as F
from peft.tuners.tuners_utils import BaseTunerLayer

from composers.handle import Handle
from composers.regions import Box, box_mask, level_size
from studio.errors import StudioError
from studio.library.warm import tuner_children


def lora_delta(layer: Any, name: str, x: torch.Tensor) -> torch.Tensor | None:
    """`scaling[name] * B(A(x))` of adapter `name` in a PEFT LoRA layer (None where the adapter has no weights)."""
    if name not in getattr(layer, "lora_A", {}):
        return None
    if name in getattr(layer, "lora_variant", {}):
        raise StudioError(f"adapter {name!r} is a LoRA variant (DoRA); the spatial composers take plain LoRA adapters")
    a, b = layer.lora_A[name], layer.lora_B[name]
    return b(a(layer.lora_dropout[name](x.to(a.weight.dtype)))) * layer.scaling[name]


def set_scales(model: torch.nn.Module, weights: dict[str, float]) -> None:
    """Set each adapter's scale (`w * alpha / r`) without activating it."""
    for module in model.modules():
        if isinstance(module, BaseTunerLayer):
            for name, weight in weights.items():
                if name in getattr(module, "lora_A", {}):
                    module.set_scale(name, float(weight))


class RegionMasks:
    """Box masks of the boxed concepts at every resolution, shared by the hooks and attention processors."""

    def __init__(self, boxes: Sequence[Box]) -> None:
        self.boxes = list(boxes)
        self.latent_hw: tuple[int, int] | None = None  # set by a pre-hook on every UNet call
        self._cache: dict[tuple, torch.Tensor] = {}

    def at(self, size: tuple[int, int], like: torch.Tensor | None = None) -> torch.Tensor:
        """(N, h, w) masks, each divided by the number of boxes covering the cell (overlaps are averaged); on `like`'s
        device and in its dtype when given, kept there (on a GPU a copy at every call would wait for the host)."""
        key = size if like is None else (size, like.device, like.dtype)
        if key not in self._cache:  # built outside inference mode: the latent guidance backpropagates through it
            with torch.inference_mode(False):
                self._cache[key] = self._normalised(size) if like is None else self.at(size).to(like)
        return self._cache[key]

    def _normalised(self, size: tuple[int, int]) -> torch.Tensor:
        masks = torch.stack([box_mask(b, size) for b in self.boxes])  # (N, h, w)
        return masks / masks.sum(0, keepdim=True).clamp_min(1.0)

    def size_of(self, tokens: int) -> tuple[int, int]:
        """(h, w) of a map with `tokens` cells at some level of the current latent."""
        if self.latent_hw is None:
            raise RuntimeError("region masks used outside a UNet call")
        for level in range(8):
            h, w = level_size(self.latent_hw, level)
            if h * w == tokens:
                return h, w
        raise RuntimeError(f"{tokens} tokens are no level of a {self.latent_hw} latent")

    def for_output(self, output: torch.Tensor) -> torch.Tensor:
        """Masks shaped to broadcast over `output`: (N, 1, 1, H, W) for (B, C, H, W), (N, 1, L, 1) for (B, L, C)."""
        if output.ndim == 4:
            return self.at(tuple(output.shape[-2:]), output)[:, None, None]  # (N, 1, 1, H, W)
        return self.at(self.size_of(output.shape[1]), output).flatten(1)[:, None, :, None]  # (N, 1, L, 1)

    def track(self, unet: torch.nn.Module) -> Callable[[], None]:
        def record(_module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
            sample = args[0] if args else kwargs["sample"]  # (B, C, H, W)
            self.latent_hw = (int(sample.shape[-2]), int(sample.shape[-1]))

        return unet.register_forward_pre_hook(record, with_kwargs=True).remove


@dataclass
class BoxedConfig:
    """The settings every boxed composer shares: a box and a region prompt per subject adapter."""

    boxes: dict[str, Box] = field(default_factory=dict, metadata={
        "help": "adapter name -> (x0, y0, x1, y1) in image fractions; adapters without a box act everywhere"})
    region_prompts: dict[str, str] = field(default_factory=dict, metadata={
        "help": "adapter name -> its region prompt; default the prompt's clause that holds its trigger"})
    layout: bool = field(default=True, metadata={
        "help": "with no boxes given, each subject's box from its clause's position words (`on the left`: the middle "
                "of the left half; composers.layout)"})

    def __post_init__(self) -> None:
        for name, box in self.boxes.items():
            try:
                box_mask(tuple(float(v) for v in box), (2, 2))
            except (TypeError, ValueError) as err:
                raise StudioError(f"--box {name}: {err}") from None
        self.boxes = {n: tuple(float(v) for v in b) for n, b in self.boxes.items()}

    def with_layout(self, prompt: str, adapters: Any) -> Any:  # -> the same config class
        """This config with boxes from `prompt`'s position words for `adapters`' subjects (an AdapterSet), when none
        were given and `layout` is on (`composers.layout.prompt_layout`)."""
        from composers.layout import subject_layout

        if self.boxes or not self.layout:
            return self
        boxes = subject_layout(prompt, adapters)
        return replace(self, boxes=boxes) if boxes else self

    def for_prompt(self, prompt: str) -> Any:  # -> the same config class
        """This config with the region prompt of every boxed adapter filled in from `prompt`."""
        from composers.concepts import region_prompts

        if all(n in self.region_prompts for n in self.boxes):
            return self
        return replace(self, region_prompts=region_prompts(prompt, list(self.boxes), self.region_prompts))


@dataclass
class BoxedSet:
    """A spatial composer's adapters: the boxed subjects, the rest (acting everywhere), the weights, and each boxed
    adapter's region prompt encoded by its own text encoder."""

    boxed: list[str]
    free: dict[str, float]  # unboxed adapters (style, background): everywhere, in every path
    weights: dict[str, float]
    region_embeds: list[Any]  # PromptEmbeds per boxed adapter
    text_encoders: list[torch.nn.Module]


def boxed_set(pipe: Any, adapters: Any, boxes: dict[str, Any], prompts: dict[str, str], composer: str, *,
              required: bool = True) -> BoxedSet:
    """Check the boxes against the adapters, encode each boxed adapter's region prompt through its own text-encoder
    adapter (tau_n of Yang et al. Eq. 2), and leave the text encoders with the unboxed adapters only, so the global
    and negative prompts are the base's (plus background adapters)."""
    from composers.activation import activate
    from studio.prompts import encode_prompt

    unknown = sorted(set(boxes) - set(adapters.names))
    if unknown:
        raise StudioError(f"--box names {unknown[0]!r}, which is not among the adapters {','.join(adapters.names)}")
    kinds = dict(zip(adapters.names, adapters.kinds or ["unknown"] * len(adapters.names)))
    boxed = [n for n in adapters.names if n in boxes and kinds[n] != "style"]
    if not boxed and required:
        raise StudioError(f"{composer} needs a box for at least one subject adapter: --box NAME:x0,y0,x1,y1, or a "
                          "place in the subject's clause of the prompt (`... on the left`)")
    weights = dict(zip(adapters.names, adapters.weights))
    free = {n: w for n, w in weights.items() if n not in boxed}
    te = [m for m in (getattr(pipe, c, None) for c in ("text_encoder", "text_encoder_2")) if m is not None]
    embeds = []
    with torch.no_grad():
        for name in boxed:
            for model in te:
                activate(model, {**free, name: weights[name]})
            embeds.append(encode_prompt(pipe, prompts[name], None, guidance=False))
    for model in te:
        activate(model, free)
    return BoxedSet(boxed, free, weights, embeds, te)


def hook_lora_layers(unet: torch.nn.Module, names: Sequence[str], hook: Callable[..., torch.Tensor], name: str,
                     skip: Callable[[str], bool] = lambda n: False) -> Handle:
    """`hook` as a forward hook on every PEFT layer of `unet` that holds one of `names` (all plain LoRA there)."""
    handle = Handle(name)
    for module_name, module in unet.named_modules():
        if not isinstance(module, BaseTunerLayer) or skip(module_name):
            continue
        held = [n for n in names if any(n in getattr(module, a, {}) for a in module.adapter_layer_names)]
        if not held:
            continue
        if not all(n in getattr(module, "lora_A", {}) for n in held):
            raise StudioError(f"adapter {held[0]!r} is not a LoRA at {module_name}; the spatial composers take LoRA "
                              "adapters (dreambooth_lora, orthogonal), not LoKr or SaRA")
        handle.add(module.register_forward_hook(hook).remove)
    return handle


class StackedDeltas:
    """`sum_n M_n(p) delta_n(x)` of one PEFT LoRA layer as one low-rank product: the concepts' down projections
    stacked (R = sum r_n outputs), each concept's rank rows masked to its box, one stacked up projection with the
    scalings folded in. The masks act between the two because the up projection is position-wise (a linear map or
    a 1x1 convolution), so this equals the per-concept sum, in two calls instead of two per concept."""

    def __init__(self, layer: Any, names: Sequence[str], boxes: Sequence[int] | None = None) -> None:
        """`names` the concepts this layer holds; `boxes` their indices among the region masks (default 0, 1, ...)."""
        boxes = list(range(len(names))) if boxes is None else list(boxes)
        a = [layer.lora_A[n] for n in names]
        b = [layer.lora_B[n] for n in names]
        self.conv = a[0] if isinstance(a[0], torch.nn.Conv2d) else None
        with torch.no_grad():
            self.down = torch.cat([m.weight for m in a])  # (R, in) or (R, in, k, k)
            self.up = torch.cat([m.weight * layer.scaling[n] for m, n in zip(b, names)], dim=1)  # (out, R[, 1, 1])
        self.owner = torch.cat([torch.full((m.weight.shape[0],), i) for i, m in zip(boxes, a)])  # (R,) its box
        self._masks: dict[tuple, torch.Tensor] = {}

    @staticmethod
    def fits(layer: Any, names: Sequence[str]) -> bool:
        """Whether every concept is a plain, bias-free LoRA of this layer with one down-projection geometry."""
        a = [layer.lora_A[n] if n in layer.lora_A else None for n in names]
        b = [layer.lora_B[n] if n in layer.lora_B else None for n in names]
        if any(m is None for m in a + b) or any(getattr(m, "bias", None) is not None for m in a + b):
            return False
        if any(n in getattr(layer, "lora_variant", {}) for n in names):
            return False
        geometry = {(type(m), getattr(m, "kernel_size", None), getattr(m, "stride", None),
                     getattr(m, "padding", None), getattr(m, "dilation", None), getattr(m, "groups", 1)) for m in a}
        return len(geometry) == 1 and all(isinstance(m, torch.nn.Linear | torch.nn.Conv2d) for m in a)

    def masks(self, regions: RegionMasks, z: torch.Tensor) -> torch.Tensor:
        """Concept n's box on its rank rows: (R, H, W) for (B, R, H, W) `z`, (L, R) for (B, L, R)."""
        size = tuple(z.shape[-2:]) if z.ndim == 4 else regions.size_of(z.shape[1])
        key = (size, z.ndim, z.dtype, z.device)
        if key not in self._masks:
            with torch.inference_mode(False):  # reused by the latent guidance's backward
                m = regions.at(size)[self.owner]  # (R, h, w)
                self._masks[key] = (m if z.ndim == 4 else m.flatten(1).T.contiguous()).to(z)
        return self._masks[key]

    def factors(self, n_boxes: int) -> list[tuple[torch.Tensor, torch.Tensor] | None]:
        """Box n's concept as (A (r, in), B (out, r)), its scaling in B, or None where it has none here (linear
        layers only)."""
        rows = [self.owner == n for n in range(n_boxes)]
        return [(self.down[r], self.up[:, r]) if r.any() else None for r in rows]

    def __call__(self, x: torch.Tensor, regions: RegionMasks) -> torch.Tensor:
        down, up = self.down.to(x), self.up.to(x)
        if self.conv is not None:
            c = self.conv
            z = F.conv2d(x, down, None, c.stride, c.padding, c.dilation, c.groups)  # (B, R, H, W)
            return F.conv2d(z * self.masks(regions, z), up)  # (B, out, H, W)
        z = F.linear(x, down)  # (B, L, R)
        return F.linear(z * self.masks(regions, z), up)  # (B, L, out)


def stack_deltas(unet: torch.nn.Module, names: Sequence[str]) -> dict[int, StackedDeltas]:
    """id(layer) -> the concepts' `StackedDeltas` for every PEFT layer of `unet` where they fit (with the adapters'
    scales as they are now)."""
    stacked: dict[int, StackedDeltas] = {}
    for module in unet.modules():
        held = [n for n in names if n in getattr(module, "lora_A", {})]
        if isinstance(module, BaseTunerLayer) and held and StackedDeltas.fits(module, held):
            stacked[id(module)] = StackedDeltas(module, held, [list(names).index(n) for n in held])
    return stacked


def install_region_deltas(
    unet: torch.nn.Module, names: Sequence[str], regions: RegionMasks, skip: Callable[[str], bool] = lambda n: False,
    stacked: dict[int, StackedDeltas] | None = None,
) -> Handle:
    """Add concept n's LoRA delta inside its box only, on every adapted UNet layer `skip` does not name (with the
    adapters' scales as they are now). `stacked`: `stack_deltas(unet, names)` made earlier, for an installation
    kept across calls (its tensors stay where a recorded step reads them)."""
    stacked = stack_deltas(unet, names) if stacked is None else stacked

    def hook(module: Any, args: tuple, output: torch.Tensor) -> torch.Tensor:
        if id(module) in stacked:
            return output + stacked[id(module)](args[0], regions)
        masks = regions.for_output(output)
        for n, name in enumerate(names):
            delta = lora_delta(module, name, args[0])
            if delta is not None:
                output = output + masks[n] * delta  # M_n(p) * (alpha / r) w B_n A_n x at each position p
        return output

    handle = Handle("region_deltas")
    bare: dict[str, int] = {}  # path -> id of the base layer put in its place
    for path, parent, attr, module in tuner_children(unet):
        if id(module) in stacked and not skip(path) and not _active(module):
            # Nothing else active here: the base layer itself runs, its stacked deltas hooked on; PEFT's forward
            # (a Python call per layer and step, adapters all inactive) stays out of the step while installed.
            base = module.get_base_layer()
            stacked[id(base)] = stacked[id(module)]
            setattr(parent, attr, base)
            handle.add(lambda parent=parent, attr=attr, module=module: setattr(parent, attr, module))
            handle.add(base.register_forward_hook(hook).remove)
            bare[path] = id(base)
    handle.add(hook_lora_layers(unet, names, hook, "region_deltas", lambda n: n in bare or skip(n)).remove)
    bare_ids = set(bare.values())
    handle.state = {i: d for i, d in stacked.items() if i in bare_ids}  # the base layers' own, for fused projections
    return handle


def _active(layer: Any) -> bool:
    """Whether a PEFT layer computes any adapter of its own (active, enabled, with weights here)."""
    held = {n for a in layer.adapter_layer_names for n in getattr(layer, a)}
    return not layer.disable_adapters and any(n in held for n in layer.active_adapters)


def install_sample_deltas(unet: torch.nn.Module, names: Sequence[str], rows: dict[str, slice]) -> Handle:
    """Add adapter n's LoRA delta to the batch rows `rows[n]` only (read at each call), on every UNet layer that
    holds it: different adapters per sample in one batched call (the per-sample scale matrix S of DESIGN.md
    section 7, S[b, n] = 1 for b in rows[n]). The adapters themselves stay inactive in PEFT, so the other rows see
    the base weights."""

    def hook(module: Any, args: tuple, output: torch.Tensor) -> torch.Tensor:
        if not rows:
            return output
        out = output.clone()
        for name, r in rows.items():
            delta = lora_delta(module, name, args[0][r])
            if delta is not None:
                out[r] = out[r] + delta  # rows of pass n: W x + (alpha / r) w B_n A_n x
        return out

    return hook_lora_layers(unet, names, hook, "sample_deltas")


class LatentEdit:
    """Latents changed inside a UNet call, handed to the scheduler's next `step` in place of the pipeline's own."""

    def __init__(self) -> None:
        self.pending: torch.Tensor | None = None
        self._wrapped: list[Any] = []

    def set(self, scheduler: Any, latents: torch.Tensor) -> None:
        if not any(s is scheduler for s in self._wrapped):
            original = scheduler.step

            def step(model_output: torch.Tensor, timestep: Any, sample: torch.Tensor, *args: Any, **kw: Any) -> Any:
                if self.pending is not None and self.pending.shape == sample.shape:
                    sample = self.pending.to(sample)  # the composer's updated z_t
                self.pending = None
                return original(model_output, timestep, sample, *args, **kw)

            scheduler.step = step
            self._wrapped.append(scheduler)
        self.pending = latents.detach()

    def remove(self) -> None:
        for scheduler in self._wrapped:
            del scheduler.step
        self._wrapped.clear()
        self.pending = None


def input_scale(scheduler: Any, timestep: Any) -> float:
    """c with `scale_model_input(z, t) = c z` (1 for DDIM and DPM-Solver, 1/sqrt(sigma^2 + 1) for Euler)."""
    return float(scheduler.scale_model_input(torch.ones(1), timestep).flatten()[0])


def cond_half(kwargs: dict[str, Any], batch: int) -> dict[str, Any]:
    """The UNet keyword arguments restricted to the conditional half `[batch:]` of a CFG batch of 2 * batch."""

    def cut(v: Any) -> Any:
        if isinstance(v, torch.Tensor) and v.ndim and v.shape[0] == 2 * batch:
            return v[batch:]
        if isinstance(v, dict):
            return {k: cut(x) for k, x in v.items()}
        return v

    return {k: cut(v) for k, v in kwargs.items()}
