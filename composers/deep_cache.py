"""DeepCache-style reuse of a UNet's deep features, kept per key (per adapter for CMLoRA).

Ma et al., "DeepCache: Accelerating Diffusion Models for Free" (CVPR 2024), §3.2: the high-level features a UNet
computes change little between adjacent denoising steps, so a "full" step keeps the feature that enters the
shallowest skip branch, and a "cached" step runs only that branch (conv_in, the first down block and the last up
block) and substitutes the kept feature. CMLoRA (Zou et al. 2025, §4.2) keeps one such cache per LoRA, at DeepCache's
shallowest branch (the authors' `cache_layer_id=0`, with `cache_block_id` at the end of the first down block).

Here the deep modules are every module between the first down block's resnets and the last up block: the first down
block's downsamplers, the other down blocks, the mid block and every up block but the last. Their `forward` is
swapped on the instance (like `composers.activation.wrap_forward`): in `record` mode they run and their outputs are
kept under the current key, in `replay` mode they return the kept outputs without running, in `off` mode they run.
The UNet's own forward is untouched, so whatever it does around the blocks (embeddings, skips, conv_out) still runs.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch

from composers.activation import wrap_forward
from studio.errors import StudioError


def deep_modules(unet: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """(name, module) of the UNet's deep path: what a cached step skips."""
    if not all(hasattr(unet, a) for a in ("down_blocks", "mid_block", "up_blocks")) or len(unet.up_blocks) < 2:
        raise StudioError(f"feature caching needs a UNet with down, mid and up blocks, not a "
                          f"{type(unet).__name__}; turn caching off (--no-cache)")
    out = [(f"down_blocks.0.downsamplers.{i}", m) for i, m in enumerate(unet.down_blocks[0].downsamplers or [])]
    out += [(f"down_blocks.{i}", m) for i, m in enumerate(unet.down_blocks) if i > 0]
    out += [("mid_block", unet.mid_block)] if unet.mid_block is not None else []
    out += [(f"up_blocks.{i}", m) for i, m in enumerate(unet.up_blocks) if i < len(unet.up_blocks) - 1]
    return out


class DeepFeatureCache:
    """The deep path of `unet`, recordable and replayable per key; `remove()` restores the original forwards."""

    def __init__(self, unet: torch.nn.Module) -> None:
        self.modules = deep_modules(unet)
        self.store: dict[str, dict[str, Any]] = {}  # key -> deep module name -> its output on the recorded call
        self.shapes: dict[str, torch.Size] = {}  # key -> the sample shape of the recorded call
        self.mode, self.key = "off", ""
        self._undo = [wrap_forward(module, self._forward(name)) for name, module in self.modules]

    def _forward(self, name: str) -> Callable[..., Any]:
        def forward(original: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
            if self.mode == "replay":
                return self.store[self.key][name]  # the kept deep feature: the module does not run
            out = original(*args, **kwargs)
            if self.mode == "record":
                self.store[self.key][name] = out
            return out

        return forward

    def has(self, key: str, shape: torch.Size) -> bool:
        """Whether `key` holds a whole recording made on a sample of this shape."""
        return self.shapes.get(key) == shape and len(self.store.get(key, {})) == len(self.modules)

    def clear(self) -> None:
        self.store.clear()
        self.shapes.clear()

    @contextmanager
    def recording(self, key: str, shape: torch.Size) -> Iterator[None]:
        """Run the deep path and keep its outputs under `key` (replacing what it held)."""
        self.store[key], self.shapes[key] = {}, shape
        with self._mode("record", key):
            yield

    @contextmanager
    def replaying(self, key: str) -> Iterator[None]:
        """Skip the deep path, substituting what `key` recorded."""
        with self._mode("replay", key):
            yield

    @contextmanager
    def _mode(self, mode: str, key: str) -> Iterator[None]:
        self.mode, self.key = mode, key
        try:
            yield
        finally:
            self.mode, self.key = "off", ""

    def remove(self) -> None:
        while self._undo:
            self._undo.pop()()
        self.clear()
