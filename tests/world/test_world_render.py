"""Renderer: deterministic by seed, a batch equals its scenes one by one, concepts render, colours are exact."""

from __future__ import annotations

from dataclasses import replace

import torch

from studio.world import emblem_dataset, render, sample_scenes, texture_dataset, world_batch
from studio.world.grammar import COLOURS, parse_caption


def test_deterministic_and_batch_equals_single() -> None:
    scenes = sample_scenes(6, seed=3)
    a = render(scenes, seed=100)
    b = render(scenes, seed=100)
    assert a.shape == (6, 3, 64, 64) and torch.equal(a, b)
    for i, s in enumerate(scenes):
        assert torch.allclose(render(s, seed=100 + i), a[i], atol=1e-6)
    assert not torch.equal(render(scenes, seed=101), a)


def test_range_and_exact_colours() -> None:
    img = render(parse_caption("a large red square on the center on a black background"), seed=0)
    assert img.min() >= 0 and img.max() <= 1
    assert torch.allclose(img[:, 32, 32], torch.tensor(COLOURS["red"]) / 255)
    assert torch.equal(img[:, 0, 0], torch.zeros(3))


def test_splits_are_apart_and_datasets_shapes() -> None:
    train = [s.caption() for s in sample_scenes(50, 0, "train")]
    evals = [s.caption() for s in sample_scenes(50, 0, "eval")]
    assert train != evals
    assert world_batch(4, 0).images.shape == (4, 3, 64, 64)
    e = emblem_dataset(7, 3)
    assert all(s.objects[0].emblem == 7 for s in e.scenes) and "emblem" in e.captions[0]
    t = texture_dataset("stripes", 3)
    assert all(s.texture == "stripes" for s in t.scenes)
    plain = render([replace(s, texture=None) for s in t.scenes], t.seeds)
    assert (t.images - plain).abs().amax() > 0.3  # the texture shows
