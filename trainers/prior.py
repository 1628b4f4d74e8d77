"""Class images for DreamBooth's prior-preservation loss (Ruiz et al., arXiv:2208.12242, section 3.3), cached on disk.

The frozen base renders the class prompt; image i always uses seed i, so the first k images of a cache are the same
whatever count was asked for: the cache is keyed by the model's checkpoint hash, the prompt, the resolution and the
sampling steps, and a larger count only renders the missing images. Files: `<cache>/class-images/<key>/NNNNN.png`
plus `info.json`; a damaged image is rendered again.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from studio import atomic
from studio.errors import StudioError
from studio.paths import cache_dir
from trainers.data import open_image, prepare_image


BATCH = 4


def class_image_dir(pipe: Any, prompt: str, resolution: int, steps: int) -> Path:
    from studio.library.compat import checkpoint_hash

    key = hashlib.sha256(f"{checkpoint_hash(pipe)}|{prompt}|{resolution}|{steps}".encode()).hexdigest()[:16]
    return cache_dir() / "class-images" / key


def class_images(
    pipe: Any, prompt: str, count: int, resolution: int, *, steps: int = 25, progress: bool = True
) -> torch.Tensor:
    """`count` images of `prompt` from the base pipeline (no adapter attached): (count, 3, R, R) in [-1, 1]."""
    from tqdm import tqdm

    from studio.generate import GenerateConfig, generate

    if count < 1:
        raise StudioError(f"--num-class-images must be at least 1, got {count}")
    folder = class_image_dir(pipe, prompt, resolution, steps)
    paths = [folder / f"{i:05d}.png" for i in range(count)]
    images: dict[int, Image.Image] = {}
    for i, path in enumerate(paths):
        if path.is_file():
            try:
                images[i] = open_image(path)
            except StudioError:
                pass  # damaged: rendered again below
    missing = [i for i in range(count) if i not in images]
    if missing:
        atomic.write_json(folder / "info.json", {"prompt": prompt, "resolution": resolution, "steps": steps})
    chunks = [missing[i : i + BATCH] for i in range(0, len(missing), BATCH)]
    for chunk in tqdm(chunks, desc="class images", disable=not progress or not chunks):
        for run in _contiguous(chunk):  # generate() gives image j the seed `seed + j`: image i keeps seed i
            config = GenerateConfig(
                prompt=prompt, seed=run[0], steps=steps, size=f"{resolution}x{resolution}", num_images=len(run)
            )
            for i, image in zip(run, generate(config, pipe=pipe).images):
                atomic.atomic_write(paths[i], lambda tmp, image=image: image.save(tmp, format="png"))
                images[i] = image
    return torch.stack([prepare_image(images[i], resolution) for i in range(count)])


def _contiguous(indices: list[int]) -> list[list[int]]:
    runs: list[list[int]] = []
    for i in indices:
        if runs and runs[-1][-1] == i - 1:
            runs[-1].append(i)
        else:
            runs.append([i])
    return runs
