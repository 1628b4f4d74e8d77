"""On the embedded base, a subject word's cross-attention lands where the prompt puts it (composers.md 9)."""

from __future__ import annotations

import torch

from composers.attention import capture_attention, mass_inside, token_indices, word_maps
from composers.regions import box_mask
from studio.generate import GenerateConfig, cached_pipeline, generate


PROMPT = "a large red circle on the left and a large blue square on the right on a white background"


def test_circle_attention_is_on_the_left_in_at_least_80_percent() -> None:
    pipe = cached_pipeline("studio-tiny", "cpu")
    circle = token_indices(pipe.tokenizer, PROMPT, "circle")
    square = token_indices(pipe.tokenizer, PROMPT, "square")
    circle_left, square_right = [], []
    for seed in range(20):
        with capture_attention(pipe.unet) as handle:
            generate(GenerateConfig(prompt=PROMPT, seed=seed, steps=20), pipe=pipe, output_type="pt")
        store = handle.state
        shares = {"circle": [], "square": []}
        for level in sorted(store.captured_levels()):
            maps = store.average(level)[1:]  # (1, h, w, tokens): the conditional half of [uncond, cond]
            left = box_mask((0.0, 0.0, 0.5, 1.0), maps.shape[1:3])  # (h, w)
            shares["circle"].append(mass_inside(word_maps(maps, circle), left))
            shares["square"].append(mass_inside(word_maps(maps, square), 1 - left))
        circle_left.append(torch.stack(shares["circle"]).mean().item())  # mean over attention levels
        square_right.append(torch.stack(shares["square"]).mean().item())
    assert sum(s > 0.5 for s in circle_left) >= 16, circle_left  # the bar: more mass in the left half, 80%
    assert sum(s > 0.5 for s in square_right) >= 16, square_right  # and the square's on the right
