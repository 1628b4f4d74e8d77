"""On the embedded base, a subject word's cross-attention lands where the prompt puts it (composers.md 9)."""

from __future__ import annotations

import pytest
import torch

from composers.attention import capture_attention, mass_inside, token_indices, word_maps
from composers.regions import box_mask
from studio.generate import GenerateConfig, cached_pipeline, generate


PROMPT = "a large red circle on the left and a large blue square on the right on a white background"


@pytest.mark.heavy
def test_circle_attention_is_on_the_left_in_at_least_80_percent() -> None:
    pipe = cached_pipeline("studio-tiny", "cpu")
    circle = token_indices(pipe.tokenizer, PROMPT, "circle")
    square = token_indices(pipe.tokenizer, PROMPT, "square")
    with capture_attention(pipe.unet) as handle:  # seeds 0-19 in one batch (the same maps as one call per seed)
        generate(GenerateConfig(prompt=PROMPT, seed=0, steps=20, num_images=20), pipe=pipe, output_type="pt")
    store = handle.state
    shares: dict[str, list[list[torch.Tensor]]] = {w: [[] for _ in range(20)] for w in ("circle", "square")}
    for level in sorted(store.captured_levels()):
        maps = store.average(level)[20:]  # (20, h, w, tokens): the conditional half of [uncond, cond]
        left = box_mask((0.0, 0.0, 0.5, 1.0), maps.shape[1:3])  # (h, w)
        for i in range(20):
            shares["circle"][i].append(mass_inside(word_maps(maps[i : i + 1], circle), left))
            shares["square"][i].append(mass_inside(word_maps(maps[i : i + 1], square), 1 - left))
    circle_left = [torch.stack(s).mean().item() for s in shares["circle"]]  # mean over attention levels
    square_right = [torch.stack(s).mean().item() for s in shares["square"]]
    assert sum(s > 0.5 for s in circle_left) >= 16, circle_left  # the bar: more mass in the left half, 80%
    assert sum(s > 0.5 for s in square_right) >= 16, square_right  # and the square's on the right
