"""Attention-processor installation, and cross-attention map capture at chosen UNet levels.

`install_processors(unet, {name: processor})` swaps only the named processors, through each attention module's own
`set_processor` (diffusers' `set_attn_processor` walks the whole UNet three times for a full dict), and its handle
restores the original processor objects, which makes removal exact.
`capture_attention(unet, levels)` installs `CaptureAttnProcessor` on the cross-attention layers (`attn2`) at those
levels only and keeps SDPA elsewhere (composers.md section 9, item 2). Maps are `softmax(Q K^T / sqrt(d))`
averaged over heads, reshaped to the layer's spatial grid: `(B, h, w, tokens)`; each row over tokens sums to 1.
With classifier-free guidance the pipeline's batch is `[uncond, cond]`, so the cond maps are the second half.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch

from composers.handle import Handle
from composers.regions import attention_levels, level_size
from lora_kernels.frame import AttentionFrame, attention, heads


def install_processors(unet: torch.nn.Module, replacements: dict[str, Any]) -> Handle:
    """Replace the named attention processors of `unet`; `Handle.remove()` puts the originals back."""
    modules = {}
    for name in replacements:
        try:
            module = unet.get_submodule(name.removesuffix(".processor"))
        except AttributeError:
            module = None
        if not name.endswith(".processor") or not hasattr(module, "set_processor"):
            raise KeyError(f"no attention processor named {name!r}; names look like "
                           f"{next(iter(unet.attn_processors))!r}")
        modules[name] = module
    originals = {name: module.processor for name, module in modules.items()}
    for name, module in modules.items():
        module.set_processor(replacements[name])

    def restore() -> None:
        for name, module in modules.items():
            module.set_processor(originals[name])

    return Handle("processors", [restore])


class AttentionStore:
    """Cross-attention maps per layer and UNet call, shaped `(B, h, w, tokens)`."""

    def __init__(self, levels: dict[str, int]) -> None:
        self.levels = levels  # processor name -> level
        self.latent_hw: tuple[int, int] | None = None  # set by a pre-hook on every UNet call
        self.maps: dict[str, list[torch.Tensor]] = {}

    def add(self, name: str, probs: torch.Tensor) -> None:
        batch, length, tokens = probs.shape  # (B, h*w, tokens), already averaged over heads
        if self.latent_hw is None:
            raise RuntimeError("attention captured outside a UNet call; install with capture_attention(unet)")
        h, w = level_size(self.latent_hw, self.levels[name])
        if h * w != length:
            raise RuntimeError(f"{name}: {length} queries do not make a {h}x{w} map of a {self.latent_hw} latent")
        self.maps.setdefault(name, []).append(probs.reshape(batch, h, w, tokens).detach())  # (B, h, w, tokens)

    def reset(self) -> None:
        self.maps.clear()

    def average(self, level: int) -> torch.Tensor:
        """Mean over the layers at `level` and over every call captured: `(B, h, w, tokens)`."""
        maps = [m for name, ms in self.maps.items() if self.levels[name] == level for m in ms]
        if not maps:
            raise KeyError(f"no maps captured at level {level}; captured levels: {sorted(self.captured_levels())}")
        return torch.stack(maps).mean(0)

    def captured_levels(self) -> set[int]:
        return {self.levels[name] for name in self.maps}


class CaptureAttnProcessor(AttentionFrame):
    """Cross-attention with explicit probabilities, which it records in an `AttentionStore`."""

    def __init__(self, store: AttentionStore, name: str) -> None:
        self.store = store
        self.name = name

    def attend(self, attn: Any, hidden_states: torch.Tensor, context: torch.Tensor | None,
               attention_mask: torch.Tensor | None) -> torch.Tensor:
        query = attn.to_q(hidden_states)
        if context is None:
            context = hidden_states
        elif attn.norm_cross:
            context = attn.norm_encoder_hidden_states(context)
        record: list[torch.Tensor] = []
        out = attention(attn, heads(attn, query), heads(attn, attn.to_k(context)), heads(attn, attn.to_v(context)),
                        attention_mask, record)  # (B, Lq, C)
        self.store.add(self.name, record[0])  # (B, Lq, Lk), averaged over heads
        return attn.to_out[0](out)


def capture_attention(unet: torch.nn.Module, levels: Iterable[int] | None = None) -> Handle:
    """Capture cross-attention maps at `levels` (default: every level); the store is `handle.state`."""
    all_levels = attention_levels(unet)
    wanted = set(all_levels.values()) if levels is None else set(levels)
    names = [n for n, lv in all_levels.items() if lv in wanted and ".attn2." in n]
    if not names:
        have = sorted(set(all_levels.values()))
        raise ValueError(f"no cross-attention at levels {sorted(wanted)}; this UNet has attention at levels {have}")
    store = AttentionStore(all_levels)

    def record_size(_module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        sample = args[0] if args else kwargs["sample"]  # (B, C, H, W)
        store.latent_hw = (int(sample.shape[-2]), int(sample.shape[-1]))

    handle = install_processors(unet, {n: CaptureAttnProcessor(store, n) for n in names})
    handle.add(unet.register_forward_pre_hook(record_size, with_kwargs=True).remove)
    handle.name, handle.state = "capture_attention", store
    return handle


def token_indices(tokenizer: Any, prompt: str, word: str) -> list[int]:
    """Positions of `word`'s tokens in the encoded `prompt` (BOS is position 0), every occurrence."""
    ids = tokenizer(prompt, truncation=True, max_length=tokenizer.model_max_length).input_ids
    sub = tokenizer(word, add_special_tokens=False).input_ids
    hits = [i for i in range(len(ids) - len(sub) + 1) if sub and ids[i : i + len(sub)] == sub]
    if not hits:
        raise ValueError(f"{word!r} is not a word of the prompt {prompt!r}")
    return [i + k for i in hits for k in range(len(sub))]


def word_maps(maps: torch.Tensor, indices: Sequence[int]) -> torch.Tensor:
    """`(B, h, w, tokens)` maps -> `(B, h, w)`: the attention mass on `indices`, summed."""
    return maps[..., list(indices)].sum(-1)


def mass_inside(word_map: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Share of a word's attention that falls inside a region: `(B, h, w)` map, `(h, w)` mask -> `(B,)`."""
    return (word_map * mask).sum((-2, -1)) / word_map.sum((-2, -1)).clamp_min(1e-12)
