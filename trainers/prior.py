"""Class images for DreamBooth's prior-preservation loss (Ruiz et al., arXiv:2208.12242, section 3.3), cached on disk.

The frozen base renders the class prompts; image i uses prompt i (cycling through the list) and seed i, so the first
k images are the same whatever count was asked for. Each prompt's images are cached under a key of the model's
checkpoint hash, the prompt, the resolution and the sampling steps, so a larger count only renders the missing
images and adapters trained on one base share them. Files: `<cache>/class-images/<key>/NNNNN.png` (N the image's
index, its seed) plus `info.json`; a damaged image is rendered again.
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


BATCH = 10  # images per generate() call (the same images as one at a time, in about 70% of the time)


def class_image_dir(pipe: Any, prompt: str, resolution: int, steps: int) -> Path:
    from studio.library.compat import checkpoint_hash

    key = hashlib.sha256(f"{checkpoint_hash(pipe)}|{prompt}|{resolution}|{steps}".encode()).hexdigest()[:16]
    return cache_dir() / "class-images" / key


def class_images(
    pipe: Any, prompts: list[str], count: int, resolution: int, *, steps: int = 25, progress: bool = True
) -> torch.Tensor:
    """`count` images from the base pipeline (no adapter attached), image i of `prompts[i % len(prompts)]`.

    Returns (count, 3, R, R) in [-1, 1].
    """
    from tqdm import tqdm

    from studio.generate import GenerateConfig, generate

    if count < 1:
        raise StudioError(f"--num-class-images must be at least 1, got {count}")
    if not prompts:
        raise StudioError("prior preservation needs a class prompt; give --class-prompt")
    prompt_of = [prompts[i % len(prompts)] for i in range(count)]
    folders = {p: class_image_dir(pipe, p, resolution, steps) for p in dict.fromkeys(prompt_of)}
    paths = [folders[p] / f"{i:05d}.png" for i, p in enumerate(prompt_of)]
    images: dict[int, Image.Image] = {}
    for i, path in enumerate(paths):
        if path.is_file():
            try:
                images[i] = open_image(path)
            except StudioError:
                pass  # damaged: rendered again below
    missing = [i for i in range(count) if i not in images]
    for prompt in dict.fromkeys(prompt_of[i] for i in missing):
        info = {"prompt": prompt, "resolution": resolution, "steps": steps}
        atomic.write_json(folders[prompt] / "info.json", info)
    bar = tqdm(total=len(missing), desc="class images", disable=not progress or not missing)
    for at in range(0, len(missing), BATCH):
        run = missing[at:at + BATCH]
        config = GenerateConfig(
            prompt=prompt_of[run[0]], steps=steps, size=f"{resolution}x{resolution}", num_images=len(run)
        )
        generated = generate(config, pipe=pipe, prompts=[prompt_of[i] for i in run], seeds=run).images
        for i, image in zip(run, generated):
            atomic.atomic_write(paths[i], lambda tmp, image=image: image.save(tmp, format="png"))
            images[i] = image
        bar.update(len(run))
    bar.close()
    return torch.stack([prepare_image(images[i], resolution) for i in range(count)])

