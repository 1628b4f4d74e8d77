"""CLoRA: contrastive test-time composition of LoRA adapters (Meral et al., arXiv:2403.19776; composers.md section 1).

Per concept prompts: prompt 0 is the prompt without any subject trigger and runs without adapters; prompt i keeps
only adapter i's trigger and runs with adapter i (style adapters run in every prompt, the paper's `style_lora`).
Each step:
1. Latent update (§3.2): cross-attention maps at the paper's resolution (W/32 x H/32, latent / 4: the UNet's
   level 2; 16x16 at 512 px, 4x4 on the embedded base) for every prompt, the contrastive loss over concept token
   groups (NT-Xent, tau 0.5: a concept's tokens attend alike across prompts, concepts apart),
   `z <- z - step_size grad_z L` on the first half of the steps; optionally repeated `refine_iterations` times at
   the `refine_at` steps (the paper's demo: 0, 10, 20 of 50 with 20 iterations; the reference code's default: none).
2. Fusion (§3.3): per adapter prompt i, the mask `M_i = U_k 1[A_i[k] > alpha max A_i[k]]` over its mask tokens;
   pixels no mask covers go to prompt 0; `eps = sum_i M_i eps_i / sum_i M_i` on both CFG halves.
Ordinary objects of the prompt (clauses without a trigger) are concepts too: their group is pushed away from the
adapter's, and their pixels take the adapter-free prediction, so they keep their own colours.
The maps are the conditional half's (Attend-and-Excite's choice; the reference code also averages the unconditional
half in, composers.md 1.2). Cost: P = adapters + 1 UNet passes per step, plus a backward on updated steps.

Ours, not the paper's, each measured on the compose bench's pairs (two emblems left and right, 6 pairs; one emblem
beside an ordinary object, 4 cases; 4 seeds each; `two subjects` = composition success, `+ object` = both right):
- Mask tokens (`place_masks`): the paper's `mask_indices` are typed by the user; here a concept's mask tokens are its
  clause's position words (`left` in `a sks emblem on the left`) when it has them, else its token group. On the
  embedded base the trigger and noun maps hardly localise: at the 8x8 and 16x16 levels every token's mean
  attention on the left and right halves differs by under 10%; at level 2 `right` puts 6.6x more on the right half,
  while the left emblem's trigger leans right (0.75x). With the group's tokens every mask covered the whole image
  (two subjects 0.00).
- Masks from the maps averaged over the steps so far (`mask_average`), not the step's own: per-step 4x4 maps flicker
  and let the adapter-free prompt draw inside an object (two subjects 0.08 -> 0.33 with position tokens; box masks
  typed from the layout, an upper bound, 0.42; 2 seeds each).
- No refinement by default (`refine_at=()`, the reference code's default): with the demo's 3 x 20 extra updates two
  subjects fell from 0.33 to 0.08 and + object from 0.75 to 0.25 (2 seeds), at about three times the cost.
Measured with these defaults (4 seeds): two subjects 0.50, + object 0.75; without the latent update
(`step_size=0`) the same, so on this base the fusion masks, not the contrastive update, do the work. The compose
bench (`studio bench compose`, 8 seeds, one run; docs/compose): two subjects 0.40 (merge, Switch, Composite and each
adapter alone 0.00), + object 0.72 (those 0.62), 4.17x the time of one adapter.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.nn.functional as F

from composers.activation import activate, sample_of, step_of, with_sample, wrap_forward
from composers.adapter_set import AdapterSet
from composers.attention import AttentionStore, CaptureAttnProcessor, install_processors
from composers.concepts import adapter_triggers, drop_words, split_concepts, token_group, trigger_positions
from composers.handle import Handle
from composers.region_lora import LatentEdit, cond_half, input_scale
from composers.regions import attention_levels
from studio.configs import check_numbers
from studio.errors import StudioError


MAP_LEVEL = 2  # the paper's maps: W/32 x H/32 pixels, the latent / 4


def map_level(unet: torch.nn.Module) -> int:
    """The paper's map level (latent / 4) where the UNet has cross-attention there, else its coarsest level."""
    levels = set(attention_levels(unet).values())
    return MAP_LEVEL if MAP_LEVEL in levels else max(levels)


@dataclass
class CloraConfig:
    step_size: float = field(default=20.0, metadata={"help": "latent update step (paper: 20)"})
    temperature: float = field(default=0.5, metadata={"help": "NT-Xent temperature tau (paper: 0.5)"})
    mask_threshold: float = field(default=0.3, metadata={"help": "alpha of the attention masks (paper: 0.3)"})
    update_until: float = field(default=0.5, metadata={"help": "update the latents on this share of the steps"})
    refine_at: tuple[float, ...] = field(default=(), metadata={
        "help": "refinement steps as shares of the schedule (paper's demo: 0, 0.2, 0.4; reference code: none)"})
    refine_iterations: int = field(default=20, metadata={"help": "extra updates at a refinement step (paper: 20)"})
    place_masks: bool = field(default=True, metadata={
        "help": "mask tokens: a clause's position words where it has them (ours; the embedded base's noun maps do not "
                "localise); off: the concept's own tokens (the paper's)"})
    mask_average: bool = field(default=True, metadata={
        "help": "masks from the maps averaged over the steps so far (ours; the paper: each step's own maps)"})
    prompt: str = field(default="", metadata={"help": "the generation prompt (filled in by `for_prompt`)"})

    def __post_init__(self) -> None:
        check_numbers(self)
        if self.refine_iterations < 0 or self.step_size < 0 or not 0 < self.temperature:
            raise StudioError("CLoRA's step size and refine iterations must be >= 0 and its temperature > 0")

    def for_prompt(self, prompt: str) -> CloraConfig:
        return replace(self, prompt=prompt)


@dataclass
class CloraPlan:
    """Prompt p's text and adapters, concept g's token positions in every prompt, and prompt p's mask tokens."""

    prompts: list[str]
    subjects: list[str]  # the adapter of prompts 1..
    groups: list[list[list[int]]]  # concept g -> prompt p -> token positions
    mask_tokens: list[list[int]]  # prompt p -> its concept's position words' tokens, else its group ([] for prompt 0)


def plan(prompt: str, adapters: list[str], kinds: dict[str, str], tokenizer: Any, places: bool = True) -> CloraPlan:
    """The per-adapter prompts, token groups and mask tokens of `prompt` (composers.md 1.1), derived from words: a
    subject's mask tokens are its clause's position words where it has them and `places` (module docstring), else its
    group (the paper's choice)."""
    triggers = adapter_triggers(adapters)
    subjects = [n for n in adapters if kinds.get(n) != "style"]
    concepts = split_concepts(prompt, {n: triggers[n] for n in subjects})
    missing = [n for n in subjects if not any(n in c.adapters for c in concepts)]
    if missing:
        raise StudioError(f"CLoRA needs the trigger of {missing[0]!r} ({' '.join(triggers[missing[0]])}) in the "
                          "prompt, in the clause of the object it stands for")
    trigger_words = {n: set(trigger_positions(prompt, triggers[n])) for n in subjects}
    prompts, kept = [], []
    for keep in [None, *subjects]:  # prompt 0: no subject trigger; prompt i: adapter i's trigger only
        dropped = set().union(*(p for n, p in trigger_words.items() if n != keep))
        prompts.append(drop_words(prompt, dropped))
        kept.append(sorted(set(range(len(prompt.split()))) - dropped))
    groups = [[token_group(tokenizer, text, [kept[p].index(i) for i in c.keys if i in kept[p]])
               for p, text in enumerate(prompts)] for c in concepts]
    masks: list[list[int]] = [[]]
    for i, n in enumerate(subjects):
        g, c = next((g, c) for g, c in enumerate(concepts) if n in c.adapters)
        where = [kept[i + 1].index(j) for j in c.places if j in kept[i + 1]] if places else []
        masks.append(token_group(tokenizer, prompts[i + 1], where) if where else groups[g][i + 1])
    return CloraPlan(prompts, subjects, groups, masks)


def contrastive_loss(vectors: torch.Tensor, labels: torch.Tensor, temperature: float) -> torch.Tensor:
    """NT-Xent over (n, d) vectors (Meral et al. Eq. 2; pytorch-metric-learning's NTXentLoss): the mean over positive
    pairs (a, p) of -log(exp(s_ap / tau) / (exp(s_ap / tau) + sum_{n: other label} exp(s_an / tau))), s cosine."""
    v = F.normalize(vectors, dim=-1)
    sim = v @ v.T / temperature  # (n, n)
    same = labels[:, None] == labels[None, :]
    eye = torch.eye(len(labels), dtype=torch.bool, device=v.device)
    positive = same & ~eye
    if not positive.any():
        return sim.sum() * 0
    negatives = torch.where(same, torch.full_like(sim, float("-inf")), sim).logsumexp(-1, keepdim=True)  # (n, 1)
    terms = -(sim - torch.logaddexp(sim, negatives.expand_as(sim)))  # (n, n)
    return terms[positive].mean()


def clora_loss(maps: list[torch.Tensor], groups: list[list[list[int]]], temperature: float) -> torch.Tensor:
    """(B,) losses: maps[p] is prompt p's (B, h, w, tokens) cross-attention; each token's map is min-max normalised
    and labelled by its concept group."""
    losses = []
    for b in range(maps[0].shape[0]):
        vectors, labels = [], []
        for g, per_prompt in enumerate(groups):
            for p, tokens in enumerate(per_prompt):
                for k in tokens:
                    v = maps[p][b, ..., k].flatten()  # (h * w,)
                    vectors.append((v - v.min()) / (v.max() - v.min()).clamp_min(1e-8))
                    labels.append(g)
        losses.append(contrastive_loss(torch.stack(vectors), torch.tensor(labels), temperature))
    return torch.stack(losses)


def attention_masks(maps: list[torch.Tensor], mask_tokens: list[list[int]], alpha: float) -> torch.Tensor:
    """(P, B, 1, h, w) fusion masks (Meral et al. §3.3): prompt i's tokens thresholded at alpha x their maximum;
    prompt 0 (no adapter) takes every cell no other mask covers."""
    ref = maps[0]  # (B, h, w, tokens)
    masks = [torch.zeros(ref.shape[:3], dtype=ref.dtype)]
    for m, tokens in zip(maps[1:], mask_tokens[1:]):
        a = m[..., tokens]  # (B, h, w, k)
        peak = a.flatten(1, 2).amax(1)[:, None, None]  # (B, 1, 1, k)
        masks.append((a > alpha * peak).any(-1).to(ref.dtype))  # (B, h, w)
    stack = torch.stack(masks)  # (P, B, h, w)
    stack[0] = (stack[1:].sum(0) == 0).to(ref.dtype)
    return stack[:, :, None]  # (P, B, 1, h, w)


class MapAverage:
    """The running mean of each prompt's maps over one generation's steps (`mask_average`); step 0 starts anew."""

    def __init__(self) -> None:
        self.sums: list[torch.Tensor] = []
        self.steps = 0

    def __call__(self, maps: list[torch.Tensor], step: int) -> list[torch.Tensor]:
        fresh = step == 0 or not self.sums or self.sums[0].shape != maps[0].shape
        self.sums = [m.clone() for m in maps] if fresh else [s + m for s, m in zip(self.sums, maps)]
        self.steps = 1 if fresh else self.steps + 1
        return [s / self.steps for s in self.sums]


class _GradStore(AttentionStore):
    """An AttentionStore that keeps the autograd graph of its maps (the loss backpropagates through them)."""

    def add(self, name: str, probs: torch.Tensor) -> None:
        batch, length, tokens = probs.shape
        h, w = self.size_of(length)
        self.maps.setdefault(name, []).append(probs.reshape(batch, h, w, tokens))  # (B, h, w, tokens)

    def size_of(self, length: int) -> tuple[int, int]:
        from composers.regions import level_size

        assert self.latent_hw is not None
        for level in range(8):
            h, w = level_size(self.latent_hw, level)
            if h * w == length:
                return h, w
        raise RuntimeError(f"{length} queries are no level of a {self.latent_hw} latent")


def apply_clora(pipe: Any, adapters: AdapterSet, config: CloraConfig) -> Handle:
    from studio.prompts import encode_prompt

    if not config.prompt:
        raise StudioError("CLoRA reads the prompt: use composers.compose, or config.for_prompt(prompt) first")
    kinds = dict(zip(adapters.names, adapters.kinds or ["unknown"] * len(adapters.names)))
    steps = plan(config.prompt, adapters.names, kinds, pipe.tokenizer, config.place_masks)
    weights = dict(zip(adapters.names, adapters.weights))
    styles = {n: w for n, w in weights.items() if kinds[n] == "style"}
    active = [styles] + [{**styles, n: weights[n]} for n in steps.subjects]  # prompt p's adapters
    unet = pipe.unet
    te = [m for m in (getattr(pipe, c, None) for c in ("text_encoder", "text_encoder_2")) if m is not None]
    embeds = []
    with torch.no_grad():  # prompt p through its own adapters' text encoder (use_text_encoder_lora)
        for text, on in zip(steps.prompts, active):
            for model in te:
                activate(model, on)
            embeds.append(encode_prompt(pipe, text, None, guidance=False).prompt_embeds)  # (1, 77, D)
    for model in te:
        activate(model, weights)
    levels = attention_levels(unet)
    store = _GradStore(levels)
    handle = Handle("clora", [lambda: activate(unet, weights)])
    edit = LatentEdit()
    handle.add(edit.remove)
    installed: dict[int, Handle] = {}
    average = MapAverage()

    def record_size(_module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        sample = args[0] if args else kwargs["sample"]
        store.latent_hw = (int(sample.shape[-2]), int(sample.shape[-1]))

    handle.add(unet.register_forward_pre_hook(record_size, with_kwargs=True).remove)

    def capture_level(level: int) -> None:
        if level not in installed:
            for other in installed.values():
                other.remove()
            installed.clear()
            names = [n for n, lv in levels.items() if lv == level and ".attn2." in n]
            installed[level] = install_processors(unet, {n: CaptureAttnProcessor(store, n) for n in names})

    handle.add(lambda: [h.remove() for h in installed.values()])

    def run_prompts(original: Callable[..., Any], z: torch.Tensor, t: Any, kw: dict, level: int,
                    negative: torch.Tensor | None) -> tuple[list[torch.Tensor], list[Any]]:
        """Every prompt's UNet pass on z ([negative, prompt] with CFG): its maps at `level` and its outputs."""
        maps, outs = [], []
        for emb, on in zip(embeds, active):
            activate(unet, on)
            cond = emb.to(z).expand(z.shape[0] // (2 if negative is not None else 1), -1, -1)
            ctx = cond if negative is None else torch.cat([negative, cond])
            store.reset()
            outs.append(original(z, t, **{**kw, "encoder_hidden_states": ctx}))
            cond_maps = store.average(level)  # (B or 2B, h, w, tokens)
            maps.append(cond_maps[cond_maps.shape[0] // 2:] if negative is not None else cond_maps)
        return maps, outs

    def forward(original: Callable[..., Any], sample: torch.Tensor, timestep: Any, *args: Any, **kw: Any) -> Any:
        if args:
            kw = {"encoder_hidden_states": args[0], **kw}
        step, total = step_of(pipe.scheduler, timestep)
        cfg = bool(getattr(pipe, "do_classifier_free_guidance", False)) and sample.shape[0] % 2 == 0
        batch = sample.shape[0] // 2 if cfg else sample.shape[0]
        level = map_level(unet)
        capture_level(level)
        z = sample[batch:] if cfg else sample  # (B, C, H, W), scaled latents
        changed = False
        if step < config.update_until * total and config.step_size > 0:
            refine = any(step == int(f * total) for f in config.refine_at)
            for _ in range(1 + (config.refine_iterations if refine else 0)):
                with torch.inference_mode(False), torch.enable_grad():
                    zg = z.clone().requires_grad_(True)
                    kwg = cond_half(kw, batch) if cfg else kw
                    kwg = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in kwg.items()}
                    maps, _ = run_prompts(original, zg, timestep, kwg, level, None)
                    loss = clora_loss(maps, steps.groups, config.temperature)  # (B,)
                    (grad,) = torch.autograd.grad(loss.sum(), zg)
                store.reset()
                z = (z - config.step_size * grad).detach()  # z <- z - step_size grad L (§3.2)
                changed = True
        sample = torch.cat([z, z]) if cfg else z
        with torch.no_grad():
            maps, outs = run_prompts(original, sample, timestep, kw, level, kw["encoder_hidden_states"][:batch]
                                     if cfg else None)
        store.reset()
        if config.mask_average:
            maps = average(maps, step)
        masks = attention_masks(maps, steps.mask_tokens, config.mask_threshold)  # (P, B, 1, h, w)
        masks = F.interpolate(masks.flatten(0, 1), size=z.shape[-2:], mode="nearest").unflatten(0, masks.shape[:2])
        if cfg:
            masks = torch.cat([masks, masks], 1)  # the same masks for both CFG halves
        eps = torch.stack([sample_of(o) for o in outs])  # (P, 2B, C, H, W)
        fused = (masks * eps).sum(0) / masks.sum(0).clamp_min(1e-8)  # sum_i M_i eps_i / sum_i M_i
        if changed:
            edit.set(pipe.scheduler, z / input_scale(pipe.scheduler, timestep))
        return with_sample(outs[0], fused)

    handle.add(wrap_forward(unet, forward))
    handle.state = steps
    return handle
