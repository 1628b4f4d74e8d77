"""The same prompts with and without a library adapter, side by side (the Train tab shows it after a run).

    from studio.compare import compare_adapter
    comparison = compare_adapter("my-emblem", ["a large sks emblem in the center on a white background"], seed=0)
    comparison.grid().save("side-by-side.png")     # one row per prompt: without | with

Both columns come from `studio.generate` with the same seeds (prompt i: seed + i), steps and size; the adapter is
loaded through a `<lora:name:weight>` tag, so the pipeline is left as it was.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from PIL import Image

from studio.errors import StudioError
from studio.generate import GenerateConfig, generate, make_grid
from studio.models import DEFAULT_MODEL


@dataclass
class Comparison:
    adapter: str
    prompts: list[str]
    seeds: list[int]
    without: list[Image.Image]  # the base alone, one per prompt
    with_adapter: list[Image.Image]  # the base with the adapter, same seeds

    def pairs(self) -> list[tuple[Image.Image, str]]:
        """(image, caption) in reading order: without, with, for each prompt."""
        out = []
        for prompt, seed, plain, adapted in zip(self.prompts, self.seeds, self.without, self.with_adapter):
            out.append((plain, f"without · seed {seed} · {prompt}"))
            out.append((adapted, f"with {self.adapter} · seed {seed} · {prompt}"))
        return out

    def grid(self) -> Image.Image:
        """One row per prompt: without the adapter on the left, with it on the right."""
        return make_grid([image for image, _ in self.pairs()], columns=2)


def compare_adapter(
    adapter: str,
    prompts: Sequence[str],
    *,
    model: str = DEFAULT_MODEL,
    seed: int = 0,
    steps: int = 20,
    size: str | None = None,
    weight: float = 1.0,
    device: str = "cpu",
    pipe: Any = None,
    progress: Callable[[int, int], None] | None = None,
) -> Comparison:
    """Render `prompts` (prompt i with seed `seed + i`) on `model` without and with the library adapter `adapter`.

    `pipe` (a loaded pipeline of `model`) is used as is and left without the adapter; by default the shared cached
    pipeline of `model` is used.
    """
    prompts = list(prompts)
    if not prompts:
        raise StudioError("no prompts to compare; give at least one prompt")
    config = GenerateConfig(prompt="", model=model, seed=seed, steps=steps, size=size, num_images=len(prompts),
                            device=device)  # fmt: skip
    done = [0]

    def tick(step: int, total: int) -> None:
        if progress is not None:
            progress(done[0] * total + step, 2 * total)

    without = generate(config, pipe=pipe, prompts=prompts, progress=tick).images
    done[0] = 1
    tagged = GenerateConfig(**{**config.__dict__, "prompt": f"<lora:{adapter}:{weight:g}>"})
    adapted = generate(tagged, pipe=pipe, prompts=prompts, progress=tick).images
    return Comparison(adapter, prompts, [seed + i for i in range(len(prompts))], without, adapted)
