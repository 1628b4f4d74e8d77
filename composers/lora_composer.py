"""LoRA-Composer: each concept's adapter works inside its own box, in one pipeline.

Yang et al., "LoRA-Composer: Leveraging Low-Rank Adaptation for Multi-Concept Customization in Training-Free
Diffusion Models", arXiv:2403.11627 (composers.md section 2).
- Concept injection (§3.3, Eq. 2-3) and concept isolation (§3.4): `composers.region_attention`; each attention runs
  over only the cells that use it (the paper's `Q_n = Q[M_n]`), and a concept's K_n, V_n are kept across steps.
- Latent re-initialisation (§3.5): at t_0 each concept's best window of its attention map lends its latent patch to
  the concept's box, then z gets its original mean and std back.
- Latent guidance (§3.4, Eq. 5-9), with `guidance=True`: on the first steps, `z <- z - phi_i grad_z L` with
  `L = L_ce + alpha L_fill + beta L_region` (alpha 0.25, beta 0.8 in the paper; its code uses 8 / 2 / 10, and the
  paper wins here), `phi_i` decaying linearly from `step_size` to half of it (the paper; the code takes a square
  root), stopped when the loss rises after the first tenth of the steps or at half of them (the code's 5 and 25 of
  50 steps, as fractions of any schedule).
An installation (region embeddings, masks, stacked deltas, processors) is kept on the pipeline for the next call
with the same adapter tensors, weights and settings: that call hooks it in again, and on a GPU replays the steps
recorded by the first (`studio.cuda_graphs.recordable`), the re-initialisation's map-capturing forward included.
Adapters without a box (and style adapters) act everywhere, as the paper's background LoRA replaces the base model.
The studio's adapters also adapt the UNet's convolutions, feed-forward and self-attention (trainers/methods/
dreambooth_lora.py: the emblem's identity lives there), which the paper's ED-LoRAs do not: with `spatial_lora` (on
by default) those deltas act inside the concept's box only, masked per position (`region_lora`, all concepts in one
stacked low-rank product); the paper's cross-attention-only injection is `spatial_lora=False`.

Two choices measured on the embedded base (DreamBooth-LoRA emblems trained beside another object, 2 threads):
- `isolate_norms` (on): the paper isolates concepts in self-attention only; the UNet's GroupNorms still normalise
  one concept's features with statistics that include the other's, and on a 16x16 latent that decides the image:
  the left emblem of a pair forms by step 8 of 20 and is gone by step 12. Statistics per box without the other
  boxes (`composers.region_norm`) took two subjects from 0.00 to 1.00 (one pair, 4 seeds).
- `guidance` (off): with the isolated norms, two subjects 0.94 without guidance, 0.83 with it and 0.89 guiding the
  first two steps only (6 pairs x 6 seeds; subject + object 0.96 in all three), at 1.4x the time with it.
`studio bench compose --prepare --category two_subjects --category subject_object --seeds 8 --composer merge
--composer switch --composer composite --composer lora_composer --composer multidiffusion` (6 pairs and 4 subject +
object cases, one run): two subjects, composition success 0.96 (merge, switch, composite 0.00; multidiffusion
0.75); one subject beside an ordinary object, both right 0.94 (merge, switch, composite and the adapter alone 0.62;
multidiffusion 0.94); time per image 1.22x one adapter (multidiffusion 2.33x, composite 1.89x).
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from composers.activation import activate, step_of, wrap_forward
from composers.adapter_set import AdapterSet
from composers.concepts import adapter_triggers, split_concepts, token_group
from composers.handle import Handle
from composers.region_attention import IsolatedSelfAttnProcessor, RegionCrossAttnProcessor, RegionState
from composers.region_lora import (
    BoxedConfig,
    BoxedSet,
    LatentEdit,
    RegionMasks,
    boxed_set,
    cond_half,
    input_scale,
    install_region_deltas,
    set_scales,
    stack_deltas,
)
from composers.region_norm import install_isolated_norms
from composers.regions import Box, attention_levels
from studio.configs import check_numbers
from studio.cuda_graphs import Recordable, forget_recordings, recordable, step_runner
from studio.errors import StudioError


@dataclass
class LoraComposerConfig(BoxedConfig):
    guidance: bool = field(default=False, metadata={
        "help": "latent guidance by the §3.4 losses (off by default: on the embedded base it cost time and no "
                "composition, see the module docstring)"})
    step_size: float = field(default=20.0, metadata={"help": "phi at the first step (paper: 20)"})
    fill_weight: float = field(default=0.25, metadata={"help": "alpha of L_fill (paper Eq. 9)"})
    region_weight: float = field(default=0.8, metadata={"help": "beta of L_region (paper Eq. 9)"})
    topk_ratio: float = field(default=0.2, metadata={"help": "share of a box's cells the losses average"})
    guide_until: float = field(default=0.5, metadata={"help": "guide at most this share of the steps (25 of 50)"})
    patience_after: float = field(default=0.1, metadata={"help": "stop at a rising loss after this share (5 of 50)"})
    reinit: bool = field(default=True, metadata={"help": "latent re-initialisation (§3.5)"})
    isolation: bool = field(default=True, metadata={"help": "concept region mask in self-attention (§3.4)"})
    isolate_norms: bool = field(default=True, metadata={
        "help": "each box's GroupNorm statistics leave the other boxes out (concept isolation in the norms, "
                "composers.region_norm)"})
    spatial_lora: bool = field(default=True, metadata={
        "help": "also apply each boxed adapter's non-cross-attention layers inside its box (studio adapters adapt "
                "convolutions); False: the paper's cross-attention-only injection"})

    def __post_init__(self) -> None:
        check_numbers(self)
        super().__post_init__()


def parse_boxes(items: list[str], *, flag: str = "--box") -> dict[str, Box]:
    """`NAME:x0,y0,x1,y1` items (image fractions, origin top-left) -> {name: box}, split at the last colon (adapter
    names have none; a `--region` PROMPT may)."""
    what = "NAME" if flag == "--box" else "PROMPT"
    boxes = {}
    for item in items:
        name, _, numbers = item.rpartition(":")
        try:
            box = tuple(float(v) for v in numbers.split(","))
        except ValueError:
            box = ()
        if not name.strip() or len(box) != 4:
            raise StudioError(f"{flag} {item!r}: write {what}:x0,y0,x1,y1 in image fractions, e.g. corgi:0,0,0.5,1")
        if name.strip() in boxes:
            raise StudioError(f"{flag} {name} is given twice; give each one box")
        boxes[name.strip()] = box
    return boxes


def guidance_level(attention: dict[str, int], latent_hw: tuple[int, int]) -> int:
    """The paper's map level (latent / 4: 16x16 for SD1.5 at 512) if its maps keep 8 cells a side, else the
    coarsest level that does (8x8 on the embedded base's 16x16 latent); `attention`: `attention_levels(unet)`."""
    levels = sorted(set(attention.values()))
    fine = [lv for lv in levels if min(latent_hw) / 2**lv >= 8] or levels[:1]
    return 2 if 2 in fine else fine[-1]


def gaussian_smooth(maps: torch.Tensor, sigma: float = 0.5) -> torch.Tensor:
    """3x3 Gaussian smoothing of (B, h, w) maps (Attend-and-Excite's, which LoRA-Composer's losses reuse)."""
    x = torch.arange(3, dtype=maps.dtype, device=maps.device) - 1
    k1 = torch.exp(-(x**2) / (2 * sigma**2))
    kernel = (k1[:, None] * k1[None, :]) / (k1.sum() ** 2)  # (3, 3)
    return F.conv2d(F.pad(maps[:, None], (1, 1, 1, 1), mode="reflect"), kernel[None, None])[:, 0]


def text_maps(maps: torch.Tensor, last: int) -> torch.Tensor:
    """(B, L, 77) cross-attention -> (B, L, 77) with Attend-and-Excite's normalisation over the text tokens 1..last-1
    (x100, softmax) and zeros elsewhere."""
    out = torch.zeros_like(maps)
    out[..., 1:last] = (maps[..., 1:last] * 100).softmax(-1)
    return out


def box_gaussian(mask: torch.Tensor) -> torch.Tensor:
    """(h, w) Gaussian over a box's bounding rectangle: coordinates in [-1, 1], sigma 1, peak 1 (§3.4)."""
    rows, cols = mask.any(1).nonzero()[:, 0], mask.any(0).nonzero()[:, 0]
    h, w = mask.shape
    y = (torch.arange(h, dtype=mask.dtype) - (rows[0] + rows[-1]) / 2) / max((rows[-1] - rows[0]) / 2, 1)
    x = (torch.arange(w, dtype=mask.dtype) - (cols[0] + cols[-1]) / 2) / max((cols[-1] - cols[0]) / 2, 1)
    return torch.exp(-(y[:, None] ** 2 + x[None, :] ** 2) / 2)  # (h, w)


def losses(state: RegionState, size: tuple[int, int], tokens: list[list[int]], last: list[int],
           config: LoraComposerConfig) -> torch.Tensor:
    """(B,) L_ce + alpha L_fill + beta L_region of the captured maps (Yang et al. Eq. 5-9)."""
    h, w = size
    masks = (state.regions.at(size) > 0).float()  # (N, h, w)
    self_attn = torch.stack(state.self_maps).mean(0) if state.self_maps else None  # (B, L, L)
    total = 0
    for n in range(len(state.names)):
        cross = text_maps(torch.stack(state.cross[n]).mean(0), last[n])  # (B, L, 77)
        m = masks[n].to(cross)
        k = max(1, int(config.topk_ratio * m.sum()))
        g = box_gaussian(masks[n]).to(cross)
        for token in tokens[n]:
            a = gaussian_smooth(cross[..., token].reshape(-1, h, w))  # (B, h, w)
            s = (a * m * g).flatten(1).topk(k, dim=1).values.mean(1)  # (B,)
            total = total + (1 - s).clamp_min(0)  # L_ce, Eq. 5-6
            masked = a * m
            fill = (masked.amax(1) - m.amax(0)).abs().mean(1) + (masked.amax(2) - m.amax(1)).abs().mean(1)
            total = total + config.fill_weight * fill  # L_fill, Eq. 7: row and column projections vs the box's
        if self_attn is not None:
            inside = m.flatten() > 0  # (L,)
            leak = self_attn[:, inside][:, :, ~inside].sum(-1)  # (B, |M|): each box query's mass outside the box
            total = total + config.region_weight * leak.topk(min(k, leak.shape[1]), dim=1).values.mean(1)  # Eq. 8
    return total


class _Inputs:
    """What an installation depends on: the set (names, weights, kinds), the settings, and the text encoders' weights
    and the set's UNet adapter tensors, the very ones (held weakly: a tensor freed and another allocated at its
    address, an adapter loaded afresh, is new) at the same versions (changed in place is new). One walk of the UNet's
    PEFT layers."""

    def __init__(self, pipe: Any, adapters: AdapterSet, config: LoraComposerConfig) -> None:
        from studio.cuda_graphs import tuner_layers

        names = set(adapters.names)
        tensors = [t for c in ("text_encoder", "text_encoder_2") if getattr(pipe, c, None) is not None
                   for t in getattr(pipe, c).parameters()]
        for _, layer in tuner_layers(pipe.unet):
            for attr in layer.adapter_layer_names:
                holder = getattr(layer, attr)
                tensors += [t for n in names if n in holder for t in holder[n].parameters()]
        self.key = (tuple(adapters.names), tuple(adapters.weights), tuple(adapters.kinds or ()), repr(config))
        self.tensors = [weakref.ref(t) for t in tensors]
        self.versions = tuple(0 if t.is_inference() else t._version for t in tensors)

    def __eq__(self, other: object) -> bool:
        return (isinstance(other, _Inputs) and self.key == other.key and self.versions == other.versions
                and len(self.tensors) == len(other.tensors)
                and all(a() is not None and a() is b() for a, b in zip(self.tensors, other.tensors)))

    __hash__ = None  # type: ignore[assignment]


@dataclass
class _Installation:
    """What LoRA-Composer computes before it hooks anything: the region prompts' embeddings, the masks and shared
    state, the processors, the boxed adapters' stacked deltas, the norms' box statistics, the token groups, and the
    entry its recorded steps are filed under. Kept on the pipeline (`_KEPT`) for the next call with the same inputs
    (`_Inputs`), which then sets nothing up and, on a GPU, replays the steps this one recorded (a fresh installation's
    tensors live elsewhere, so its steps would be recorded again)."""

    inputs: _Inputs
    concepts: BoxedSet
    regions: RegionMasks
    state: RegionState
    processors: dict[str, Any]
    stacked: dict[int, Any] | None
    norms: dict[tuple, Any]
    groups: list[list[int]]
    lasts: list[int]
    entry: Recordable


_KEPT: weakref.WeakKeyDictionary[Any, _Installation] = weakref.WeakKeyDictionary()  # pipeline -> its last one


def _install(pipe: Any, adapters: AdapterSet, config: LoraComposerConfig, inputs: _Inputs) -> _Installation:
    concepts = boxed_set(pipe, adapters, config.boxes, config.region_prompts, "lora_composer")
    boxed, weights = concepts.boxed, concepts.weights
    embeds = [e.prompt_embeds for e in concepts.region_embeds]  # P^n through concept n's text encoder (Eq. 2)
    unet = pipe.unet
    regions = RegionMasks([config.boxes[n] for n in boxed])
    levels = attention_levels(unet)
    state = RegionState(boxed, regions, embeds, 0, levels)
    processors = {n: RegionCrossAttnProcessor(state, n) for n in levels if ".attn2." in n}
    if config.isolation:
        processors.update({n: IsolatedSelfAttnProcessor(state, n) for n in levels if ".attn1." in n})
    set_scales(unet, {n: weights[n] for n in boxed})
    stacked = stack_deltas(unet, boxed) if config.spatial_lora else None
    tokenizer = pipe.tokenizer
    groups, lasts = [], []
    for name in boxed:
        text = config.region_prompts[name]
        [concept] = split_concepts(text, adapter_triggers([name]))[:1] or [None]
        keys = concept.keys if concept is not None else []
        groups.append(token_group(tokenizer, text, keys) or [1])
        lasts.append(len(tokenizer(text, truncation=True, max_length=tokenizer.model_max_length).input_ids) - 1)
    entry = Recordable(lambda: (state.uncond, state.level, state.capture), outputs=state)  # maps when capturing
    return _Installation(inputs, concepts, regions, state, processors, stacked, {}, groups, lasts, entry)


def apply_lora_composer(pipe: Any, adapters: AdapterSet, config: LoraComposerConfig) -> Handle:
    config = config.for_prompt("")  # region prompts not filled from a prompt: the trigger words alone
    unet = pipe.unet
    inputs = _Inputs(pipe, adapters, config)
    kept = _KEPT.get(pipe)
    if kept is not None and kept.inputs == inputs:
        for model in kept.concepts.text_encoders:  # as `boxed_set` leaves them: the unboxed adapters only
            activate(model, kept.concepts.free)
    else:
        if kept is not None:
            forget_recordings(unet, kept.entry)
        _KEPT.pop(pipe, None)
        kept = _KEPT[pipe] = _install(pipe, adapters, config, inputs)
    concepts, regions, state, groups, lasts = kept.concepts, kept.regions, kept.state, kept.groups, kept.lasts
    boxed, free, weights = concepts.boxed, concepts.free, concepts.weights
    levels = state.levels
    handle = Handle("lora_composer", [lambda: activate(unet, weights)])
    for model in concepts.text_encoders:  # the global prompt went through the base text encoder (plus background)
        handle.add(lambda model=model: activate(model, weights))
    activate(unet, free)
    set_scales(unet, {n: weights[n] for n in boxed})
    handle.add(regions.track(unet))
    from composers.attention import install_processors

    handle.add(install_processors(unet, kept.processors).remove)
    if config.isolate_norms:
        handle.add(install_isolated_norms(unet, regions, kept.norms).remove)
    cross_only = (".attn2.to_k", ".attn2.to_v", ".attn2.to_out.0")
    if kept.stacked is not None:
        deltas = install_region_deltas(unet, boxed, regions, lambda n: n.endswith(cross_only), kept.stacked)
        handle.add(deltas.remove)
        state.stacked = deltas.state  # the isolated self-attention projects through the fused kernel with them
    edit = LatentEdit()
    handle.add(edit.remove)
    run = {"loss": math.inf, "guiding": True}

    def unet_cond(original: Callable[..., Any], z: torch.Tensor, t: Any, args: tuple, kw: dict, batch: int,
                  cfg: bool) -> tuple[int, int]:
        """One conditional forward on scaled latents z, capturing the maps; returns the (h, w) of the maps."""
        state.clear()
        state.capture, state.uncond = True, 0
        try:  # recorded too where the steps are (not while guiding: autograd), its maps handed back at each replay
            step_runner(unet, original)(z, t, *args, **(cond_half(kw, batch) if cfg else kw))
        finally:
            state.capture = False
        return regions.size_of(state.cross[0][0].shape[1])

    def forward(original: Callable[..., Any], sample: torch.Tensor, timestep: Any, *args: Any, **kw: Any) -> Any:
        step, total = step_of(pipe.scheduler, timestep)
        cfg = bool(getattr(pipe, "do_classifier_free_guidance", False)) and sample.shape[0] % 2 == 0
        batch = sample.shape[0] // 2 if cfg else sample.shape[0]
        state.level = guidance_level(levels, tuple(sample.shape[-2:]))  # levels read once: a walk of the UNet
        if step == 0:
            run.update(loss=math.inf, guiding=config.guidance)
        changed = False
        c = input_scale(pipe.scheduler, timestep)
        z = sample[batch:] if cfg else sample  # (B, C, H, W) scaled latents, the conditional half
        if step == 0 and config.reinit:
            with torch.no_grad():
                size = unet_cond(original, z, timestep, args, kw, batch, cfg)
                z = reinitialise(z, state, size, groups, lasts)
            changed = True
        if run["guiding"] and config.guidance:
            with torch.inference_mode(False), torch.enable_grad():
                zg = z.clone().requires_grad_(True)
                kwg = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
                size = unet_cond(original, zg, timestep.clone() if isinstance(timestep, torch.Tensor)
                                 else timestep, args, kwg, batch, cfg)
                loss = losses(state, size, groups, lasts, config)  # (B,)
                (grad,) = torch.autograd.grad(loss.sum(), zg)
            state.clear()
            phi = config.step_size * (1 - 0.5 * step / max(total - 1, 1))  # linear decay 1 -> 0.5 (§3.4)
            z = (z - phi * grad).detach()  # z_t <- z_t - phi_i grad L
            changed = True
            value = float(loss.mean())
            rising = value > run["loss"] and step >= config.patience_after * total
            if rising or step + 1 >= config.guide_until * total:
                run["guiding"] = False  # adaptive sampling steps: stop guiding
            run["loss"] = value
        state.uncond = batch if cfg else 0
        if changed:
            sample = torch.cat([z, z]) if cfg else z
            edit.set(pipe.scheduler, z / c)
        return step_runner(unet, original)(sample, timestep, *args, **kw)  # a CUDA graph's replay where recorded

    handle.add(wrap_forward(unet, forward))
    if not config.guidance:  # the step itself reads only tensors fixed for the generation, and these numbers
        handle.add(recordable(unet, kept.entry))
    handle.state = state
    return handle


def reinitialise(z: torch.Tensor, state: RegionState, size: tuple[int, int], groups: list[list[int]],
                 lasts: list[int]) -> torch.Tensor:
    """Yang et al. §3.5: copy each concept's best-attended window of z into its box, then restore z's statistics."""
    h, w = size
    scale_y, scale_x = z.shape[-2] // h, z.shape[-1] // w
    out = z.clone()
    for n in range(len(state.names)):
        cross = text_maps(torch.stack(state.cross[n]).mean(0), lasts[n])  # (B, L, 77)
        concept = cross[..., groups[n]].sum(-1).reshape(-1, 1, h, w)  # (B, 1, h, w)
        mask = state.regions.at(size)[n] > 0  # (h, w)
        rows, cols = mask.any(1).nonzero()[:, 0], mask.any(0).nonzero()[:, 0]
        bh, bw = int(rows[-1] - rows[0] + 1), int(cols[-1] - cols[0] + 1)
        scores = F.conv2d(concept, torch.ones(1, 1, bh, bw).to(concept))  # (B, 1, h-bh+1, w-bw+1), valid
        for b in range(z.shape[0]):
            i, j = divmod(int(scores[b, 0].flatten().argmax()), scores.shape[-1])
            src = z[b, :, i * scale_y:(i + bh) * scale_y, j * scale_x:(j + bw) * scale_x]
            out[b, :, int(rows[0]) * scale_y:(int(rows[0]) + bh) * scale_y,
                int(cols[0]) * scale_x:(int(cols[0]) + bw) * scale_x] = src
    dims = (1, 2, 3)
    out = (out - out.mean(dims, keepdim=True)) / out.std(dims, keepdim=True)
    return out * z.std(dims, keepdim=True) + z.mean(dims, keepdim=True)  # z's own mean and std again
