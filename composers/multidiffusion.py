"""MultiDiffusion with one adapter per region: each concept denoises the whole latent with its own adapter and region
prompt, and the predictions are fused by the regions' masks, in one batched UNet call.

Bar-Tal et al., "MultiDiffusion: Fusing Diffusion Paths for Controlled Image Generation", ICML 2023,
arXiv:2302.08113. Region generation (§3.2 and §4.2): paths `Phi_i` with their own prompts, fused by the closed form of
Eq. 5, `J(x) = sum_i F_i^-1(W_i * Phi(x_i)) / sum_j F_j^-1(W_j)` with `F_i` the identity (every path sees the whole
latent) and `W_i` region masks. For a DDIM-like step, fusing the noise predictions equals fusing the next latents
(the step is linear in eps), so the fusion is applied to the UNet's prediction, on both CFG halves:
`eps = sum_i M_i eps_i / sum_i M_i` (the fusion CLoRA, Meral et al. §3.3, applies with attention masks).
- Path 0: the global prompt with the unboxed adapters (style / background adapters), mask 1 outside every box.
- Path n: concept n's region prompt (default: its clause of the prompt, as LoRA-Composer's region prompts) with
  adapter n added, mask = its box; overlaps are averaged.
- A prompt region (`regions`, section 4.2's region prompts with no adapter of their own): its prompt with the
  adapters that act everywhere, mask = its box. One adapter that holds several concepts (a merge of orthogonal
  adapters: one trigger per concept) is placed this way, each concept by its own clause of the prompt: the
  regionally controllable sampling that orthogonal adaptation's multi-concept results use (Po et al., CVPR 2024,
  section 4.2, after Mix-of-Show).

Beside LoRA-Composer: MultiDiffusion keeps a subject in a path of its own, so no layer of another concept's pass
can reach it, at `1 + boxes` UNet passes a step; LoRA-Composer gets the same isolation inside one pass (region
attention, box-masked deltas, and per-box norm statistics, `composers.region_norm`). Both take the same boxes. The
paths are batched into one call: different adapters per sample through `install_sample_deltas` (adapters stay
inactive in PEFT, each row adds its own LoRA delta).

Measured on the embedded base (`studio bench compose --prepare --category two_subjects --category subject_object
--seeds 8 --composer merge --composer switch --composer composite --composer lora_composer --composer
multidiffusion`, DreamBooth-LoRA emblems trained beside another object, 2 threads, one run): two subjects,
composition success 0.75 (lora_composer 0.96; merge, switch, composite 0.00); one subject beside an ordinary object,
both right 0.94 (lora_composer 0.94, merge 0.62); time per image 2.33x one adapter (lora_composer 1.22x): on a CPU
the batched paths cost what separate calls would; on a GPU one image is launch-bound and the paths ride in the same
calls.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from composers.activation import activate, sample_of, with_sample, wrap_forward
from composers.adapter_set import AdapterSet
from composers.handle import Handle
from composers.region_lora import BoxedConfig, boxed_set, install_sample_deltas, set_scales
from composers.regions import Box, box_mask
from studio.errors import StudioError
from studio.prompts import encode_prompt


@dataclass
class MultiDiffusionConfig(BoxedConfig):
    batched: bool = field(default=True, metadata={
        "help": "run every path in one UNet call (False: one call per path, less memory)"})
    regions: dict[str, Box] = field(default_factory=dict, metadata={
        "help": "region prompt -> (x0, y0, x1, y1): paths of their own, denoised with the adapters that act "
                "everywhere (MultiDiffusion's region prompts); with no boxes given, filled from the prompt's placed "
                "clauses for an adapter that holds several concepts (a merge of orthogonal adapters)"})

    def __post_init__(self) -> None:
        super().__post_init__()
        for text, box in self.regions.items():
            if not text.strip():
                raise StudioError("a region needs a prompt: --region 'PROMPT:x0,y0,x1,y1'")
            try:
                box_mask(tuple(float(v) for v in box), (2, 2))  # the same checks as a box
            except (TypeError, ValueError) as err:
                raise StudioError(f"--region {text!r}: {err}") from None
        self.regions = {t: tuple(float(v) for v in b) for t, b in self.regions.items()}

    def with_layout(self, prompt: str, adapters: Any) -> MultiDiffusionConfig:
        """Boxes from the prompt as every boxed composer takes them; an adapter whose triggers sit in several placed
        clauses (one adapter, several concepts) acts everywhere instead, and each of its clauses gets a region."""
        from composers.concepts import adapter_triggers
        from composers.layout import shared_regions

        if self.boxes or self.regions or not self.layout:
            return self
        kinds = dict(zip(adapters.names, adapters.kinds or ["unknown"] * len(adapters.names)))
        subjects = [n for n in adapters.names if kinds.get(n) != "style"]
        shared = shared_regions(prompt, adapter_triggers(list(adapters.names)), subjects)
        config = super().with_layout(prompt, adapters)
        if not shared:
            return config
        boxes = {n: b for n, b in config.boxes.items() if n not in shared}
        return replace(config, boxes=boxes, regions={t: b for r in shared.values() for t, b in r.items()})


def path_masks(boxes: list[Box], size: tuple[int, int]) -> torch.Tensor:
    """(1 + N, 1, 1, h, w) fusion weights: path 0 outside every box, path n inside box n, overlaps averaged."""
    inside = torch.stack([box_mask(b, size) for b in boxes])  # (N, h, w)
    outside = (inside.sum(0) == 0).float()[None]  # (1, h, w)
    masks = torch.cat([outside, inside])  # (1 + N, h, w)
    return (masks / masks.sum(0, keepdim=True).clamp_min(1.0))[:, None, None]


def cat_paths(values: list[Any], batch: int) -> Any:
    """The paths' values of one UNet argument as one batch: tensors whose leading dimension is `batch` concatenated
    (dicts recursed); anything else is shared and taken from the first path."""
    first = values[0]
    if isinstance(first, torch.Tensor) and first.ndim and first.shape[0] == batch:
        return torch.cat(values)  # (P * batch, ...)
    if isinstance(first, dict):
        return {k: cat_paths([v[k] for v in values], batch) for k in first}
    return first


def apply_multidiffusion(pipe: Any, adapters: AdapterSet, config: MultiDiffusionConfig) -> Handle:
    config = config.for_prompt("")  # region prompts not filled from a prompt: the trigger words alone
    concepts = boxed_set(pipe, adapters, config.boxes, config.region_prompts, "multidiffusion",
                         required=not config.regions)
    boxed, free, weights = concepts.boxed, concepts.free, concepts.weights
    with torch.no_grad():  # the text encoders hold the adapters that act everywhere, as for the global prompt
        region = concepts.region_embeds + [encode_prompt(pipe, text, None, guidance=False) for text in config.regions]
    boxes = [config.boxes[n] for n in boxed] + list(config.regions.values())
    unet = pipe.unet
    handle = Handle("multidiffusion", [lambda: activate(unet, weights)])
    for model in concepts.text_encoders:  # the global and negative prompts went through path 0's text encoder
        handle.add(lambda model=model: activate(model, weights))
    activate(unet, free)  # boxed adapters act only through their rows' deltas
    set_scales(unet, {n: weights[n] for n in boxed})
    paths = 1 + len(region)  # the global path, one per boxed adapter, one per prompt region
    rows: dict[str, slice] = {}
    handle.add(install_sample_deltas(unet, boxed, rows).remove)

    def contexts(kw: dict[str, Any], batch: int, cfg: bool) -> list[dict[str, Any]]:
        """Per path, the keyword arguments of its UNet call: its prompt in the conditional rows."""
        out = [kw]
        for embeds in region:
            ctx = kw["encoder_hidden_states"].clone()  # (2B or B, 77, D)
            cond = slice(batch, None) if cfg else slice(None)
            ctx[cond] = embeds.prompt_embeds.to(ctx)  # (1, 77, D) broadcast over the conditional rows
            path = {**kw, "encoder_hidden_states": ctx}
            added = kw.get("added_cond_kwargs")
            if added and embeds.pooled_prompt_embeds is not None and "text_embeds" in added:  # SDXL's pooled text
                text = added["text_embeds"].clone()
                text[cond] = embeds.pooled_prompt_embeds.to(text)
                path["added_cond_kwargs"] = {**added, "text_embeds": text}
            out.append(path)
        return out

    def forward(original: Callable[..., Any], sample: torch.Tensor, timestep: Any, *args: Any, **kw: Any) -> Any:
        if args:
            kw = {"encoder_hidden_states": args[0], **kw}
        cfg = bool(getattr(pipe, "do_classifier_free_guidance", False)) and sample.shape[0] % 2 == 0
        rows_per_path = sample.shape[0]  # 2B with CFG
        per_path = contexts(kw, rows_per_path // 2 if cfg else rows_per_path, cfg)
        if config.batched:
            big = {k: cat_paths([p[k] for p in per_path], rows_per_path) for k in kw}
            rows.clear()
            rows.update({n: slice((i + 1) * rows_per_path, (i + 2) * rows_per_path) for i, n in enumerate(boxed)})
            try:
                out = original(sample.repeat(paths, 1, 1, 1), cat_paths([timestep] * paths, rows_per_path), **big)
            finally:
                rows.clear()
            eps = sample_of(out).unflatten(0, (paths, rows_per_path))  # (P, 2B, C, H, W)
        else:
            outs = []
            for i, path in enumerate(per_path):
                rows.clear()
                if 0 < i <= len(boxed):
                    rows[boxed[i - 1]] = slice(None)
                try:
                    out = original(sample, timestep, **path)  # the last path's output carries the fused sample
                finally:
                    rows.clear()
                outs.append(sample_of(out))
            eps = torch.stack(outs)  # (P, 2B, C, H, W)
        masks = path_masks(boxes, tuple(sample.shape[-2:])).to(eps)  # (P, 1, 1, h, w)
        fused = (masks * eps).sum(0)  # sum_i M_i eps_i, M normalised to sum 1 (Eq. 5)
        return with_sample(out, fused)

    handle.add(wrap_forward(unet, forward))
    return handle
