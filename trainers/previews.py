"""Training previews: the sample prompts generated with the adapter as it is at a step, at fixed seeds, so previews of
successive steps differ only by what training changed; saved as one grid per step (`samples/step-NNNNNN.png`)."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

from torch import nn

from studio import atomic


def previews(pipe: Any, models: Iterable[nn.Module], prompts: list[str], seed: int, steps: int, resolution: int,
             step: int) -> list[Any]:
    """One PIL image per prompt (seed + i for prompt i, one batch), each tagged in its `info` with its prompt, seed and
    the training step; `models` are put in eval mode for it and back in their modes after."""
    from studio.generate import GenerateConfig, generate

    if not prompts:
        return []
    models = list(models)
    modes = [m.training for m in models]
    for model in models:
        model.eval()
    try:
        config = GenerateConfig(prompt=prompts[0], seed=seed, steps=steps, num_images=len(prompts),
                                size=f"{resolution}x{resolution}")
        images = generate(config, pipe=pipe, prompts=prompts).images
    finally:
        for model, mode in zip(models, modes):
            model.train(mode)
    for i, (image, prompt) in enumerate(zip(images, prompts)):
        image.info.update(prompt=prompt, seed=seed + i, step=step)  # what the preview shows
    return images


def save_grid(images: list[Any], path: Path) -> Path:
    """The images side by side in one PNG, written atomically."""
    from studio.generate import make_grid

    grid = make_grid(images)
    return atomic.atomic_write(path, lambda tmp: grid.save(tmp, format="png"))
