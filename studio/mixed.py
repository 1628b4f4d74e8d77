"""Different adapters per image in one batched generation (`studio batch --group N`, `generate(adapter_sets=...)`).

Image b of the batch asks for adapters with weights (`<lora:name:w>` tags); over the K adapters of the whole batch
that is the per-sample scale matrix S (B, K) of DESIGN.md section 7, S[b, k] = w (0 where image b has no adapter k),
and every adapted layer computes

    y = x W^T + b + sum_k S[b, k] (x A_k^T) B_k^T                                        (1)

- Attention: `lora_kernels.dispatch.FusedLoRAAttnProcessor` computes q, k and v from one read of x, and to_out, with
  the K adapters' factors and S: the Triton kernel on a GPU, its torch reference elsewhere.
- Every other LoRA layer (feed-forward, projections, ResNet convolutions): a forward hook adds the stacked deltas,
  ((x A_cat^T) * S_col) B_cat^T (`lora_kernels.reference`, Eq. 2 without the base GEMM; for a convolution A_cat is
  the stacked down convolutions and B_cat the stacked 1x1 up convolutions).
- Text encoders: each distinct adapter set encodes its images' prompts with exactly that set active, as a
  generation of that image alone would.
With guidance the UNet's batch is [unconditional; conditional], so S is repeated. The UNet's PEFT layers are
switched off for the call (their factors are read, not run), and the processors, hooks and switches are undone
after. Only adapters that are plain LoRA on the UNet mix (`why_not_mixed`); LoKr and SaRA adapters generate one
image at a time.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from lora_kernels.dispatch import AdapterFactors, FusedLoRAAttnProcessor
from lora_kernels.reference import column_scales
from studio.errors import StudioError


def _plain_lora(layer: Any, names: Sequence[str]) -> bool:
    """Every one of `names` this layer holds is a plain LoRA: bias-free Linear or Conv2d factors, no variant."""
    for name in names:
        if not any(name in getattr(layer, a, {}) for a in layer.adapter_layer_names):
            continue
        if name not in getattr(layer, "lora_A", {}) or name in getattr(layer, "lora_variant", {}):
            return False
        a, b = layer.lora_A[name], layer.lora_B[name]
        if not isinstance(a, nn.Linear | nn.Conv2d) or a.bias is not None or b.bias is not None:
            return False
    return True


def why_not_mixed(pipe: Any, names: Sequence[str]) -> str | None:
    """None when the loaded adapters `names` can differ per image in one batch, else which one cannot. Only the
    UNet's layers matter: the text encoders run once per adapter set, with the set active as usual."""
    from studio.library import sparse

    dense = [n for n in names if n in sparse.loaded(pipe)]
    if dense:
        return f"adapter {dense[0]!r} is a sparse weight delta (SaRA)"
    for path, layer in pipe.unet.named_modules():
        if isinstance(layer, BaseTunerLayer) and not _plain_lora(layer, names):
            return f"an adapter at unet.{path} is not a plain LoRA"
    return None


class StackedLoRA:
    """The K adapters' deltas of one LoRA layer in one shrink and one expand: ((x A_cat^T) * S_col) B_cat^T."""

    def __init__(self, layer: Any, names: Sequence[str], columns: Sequence[int]) -> None:
        held = [(n, c) for n, c in zip(names, columns) if n in layer.lora_A]
        a = [layer.lora_A[n] for n, _ in held]
        self.conv = a[0] if isinstance(a[0], nn.Conv2d) else None
        self.down = torch.cat([m.weight for m in a])  # (R, in) or (R, in, k, k)
        self.up = torch.cat([layer.lora_B[n].weight * layer.scaling[n] for n, _ in held], dim=1)  # (out, R[, 1, 1])
        self.ranks = [m.weight.shape[0] for m in a]
        self.columns = torch.tensor([c for _, c in held], device=self.down.device)  # (G,): each adapter's S column

    def __call__(self, x: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
        """The deltas for x (B, ..., in) or (B, in, H, W), S (B, K): (B, ..., out) or (B, out, H, W)."""
        s = scales.to(x).index_select(1, self.columns)  # (B, G)
        s_col = column_scales(s, self.ranks)  # (B, R)
        down, up = self.down.to(x), self.up.to(x)
        if self.conv is not None:
            c = self.conv
            z = F.conv2d(x, down, None, c.stride, c.padding, c.dilation, c.groups)  # (B, R, H, W)
            return F.conv2d(z * s_col[:, :, None, None], up)  # (B, out, H, W)
        z = F.linear(x, down)  # (B, ..., R)
        return F.linear(z * s_col.view(s_col.shape[0], *[1] * (z.ndim - 2), -1), up)  # (B, ..., out)


def _triple(layer: Any, name: str) -> tuple[torch.Tensor, torch.Tensor, float] | None:
    if name not in getattr(layer, "lora_A", {}):
        return None
    return layer.lora_A[name].weight, layer.lora_B[name].weight, float(layer.scaling[name])  # A (r, in), B (out, r)


def _attention_factors(attn: Any, names: Sequence[str]) -> AdapterFactors | None:
    """The adapters' factors on one diffusers `Attention` (None where none of them touches it)."""
    layers = {"q": attn.to_q, "k": attn.to_k, "v": attn.to_v, "out": attn.to_out[0]}
    lists = {p: [_triple(layer, n) for n in names] for p, layer in layers.items()}
    if all(t is None for ts in lists.values() for t in ts):
        return None
    return AdapterFactors(q=lists["q"], k=lists["k"], v=lists["v"], out=lists["out"])


@contextlib.contextmanager
def per_sample_adapters(unet: nn.Module, names: Sequence[str], scales: torch.Tensor) -> Iterator[None]:
    """Within the block, the UNet applies adapter `names[k]` to batch row b with weight `scales[b, k]` (B, K), Eq.
    (1). The adapters must be loaded with weight 1 (their PEFT scaling alpha / r); the batch must have B rows."""
    from diffusers.models.attention_processor import Attention

    rows = scales.shape[0]

    def row_scales(batch: int, _tokens: int) -> torch.Tensor:
        if batch != rows:
            raise StudioError(f"per-image adapters were set for {rows} batch rows, the UNet got {batch}")
        return scales

    processors = dict(unet.attn_processors)
    fused, covered = {}, set()
    for path, module in unet.named_modules():
        if isinstance(module, Attention) and (factors := _attention_factors(module, names)) is not None:
            fused[f"{path}.processor"] = FusedLoRAAttnProcessor(factors, scales=row_scales)
            covered.update(id(m) for m in (module.to_q, module.to_k, module.to_v, module.to_out[0]))
    stacks = {
        id(m): StackedLoRA(m, names, range(len(names)))
        for m in unet.modules()
        if isinstance(m, BaseTunerLayer) and id(m) not in covered and any(n in getattr(m, "lora_A", {}) for n in names)
    }

    def add_deltas(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        return output + stacks[id(module)](args[0], row_scales(args[0].shape[0], 0))

    switched = [m for m in unet.modules() if isinstance(m, BaseTunerLayer) and not m.disable_adapters]
    trained = {p: p.requires_grad for m in switched for a in m.adapter_layer_names for p in getattr(m, a).parameters()}
    handles = [m.register_forward_hook(add_deltas) for m in unet.modules() if id(m) in stacks]
    try:
        for m in switched:
            m.enable_adapters(False)  # factors are read above, not run by PEFT
        unet.set_attn_processor({**processors, **fused})
        yield
    finally:
        unet.set_attn_processor(processors)
        for handle in handles:
            handle.remove()
        for m in switched:
            m.enable_adapters(True)  # PEFT also makes the active adapters trainable again: undone below
        for p, flag in trained.items():
            p.requires_grad_(flag)


class MixedUnsupported(StudioError):
    """These adapters cannot differ per image in one batch (not plain LoRA): generate the images one at a time."""


def encode_per_set(pipe: Any, prompts: Sequence[str], sets: Sequence[dict[str, float]], negative: str | None,
                   guided: bool, clip_skip: int | None) -> Any:
    """Prompt embeddings (`studio.prompts.PromptEmbeds`) of image b's prompt with exactly adapter set `sets[b]`
    active in the text encoders (each distinct set encodes its images in one call)."""
    from studio.library.load import set_weights
    from studio.prompts import PromptEmbeds, encode_prompt

    groups: dict[tuple, list[int]] = {}
    for i, chosen in enumerate(sets):
        groups.setdefault(tuple(sorted(chosen.items())), []).append(i)
    parts = []
    for key, rows in groups.items():
        set_weights(pipe, dict(key))
        parts.append((rows, encode_prompt(pipe, [prompts[i] for i in rows], negative, guidance=guided,
                                          clip_skip=clip_skip)))

    def gather(field: str) -> torch.Tensor | None:
        if getattr(parts[0][1], field) is None:
            return None
        out = [torch.empty(0)] * len(prompts)
        for rows, embeds in parts:
            for j, i in enumerate(rows):
                out[i] = getattr(embeds, field)[j]
        return torch.stack(out)  # (B, ...) in image order

    return PromptEmbeds(*(gather(f) for f in ("prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds",
                                               "negative_pooled_prompt_embeds")))


@contextlib.contextmanager
def mixed_adapters(pipe: Any, prompts: Sequence[str], sets: Sequence[dict[str, float]], negative: str | None,
                   guided: bool, clip_skip: int | None) -> Iterator[Any]:
    """Image b generated with adapter set `sets[b]` (all loaded already): yields the prompt embeddings; within the
    block the UNet mixes the adapters per image. Raises `MixedUnsupported` for adapters that cannot mix."""
    from studio.library.load import loaded_adapters, set_weights

    names = sorted({n for chosen in sets for n in chosen})
    reason = why_not_mixed(pipe, names)
    if reason is not None:
        raise MixedUnsupported(f"images with different adapters cannot share a batch: {reason}; generate them one "
                               "at a time (studio batch --group 1)")
    loaded = loaded_adapters(pipe)
    try:
        embeds = encode_per_set(pipe, prompts, sets, negative, guided, clip_skip)
        set_weights(pipe, dict.fromkeys(names, 1.0))  # PEFT scaling alpha / r: the weights go into S
        s = torch.tensor([[chosen.get(n, 0.0) for n in names] for chosen in sets], device=pipe.unet.device)  # (B, K)
        with per_sample_adapters(pipe.unet, names, torch.cat([s, s]) if guided else s):  # [uncond; cond] rows
            yield embeds
    finally:
        set_weights(pipe, loaded)  # the loaded adapters active and weighted as before
