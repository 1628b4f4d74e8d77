"""NegCLIP hard negatives: the same scene with exactly one position or one colour binding changed."""

from __future__ import annotations

import numpy as np

from studio.world.datasets import sample_scenes
from studio.world.grammar import parse_caption
from studio.world.negatives import hard_negative


def test_a_negative_changes_one_position_or_swaps_two_colours_and_nothing_else() -> None:
    rng = np.random.default_rng(0)
    kinds = {"position": 0, "binding": 0}
    for scene in sample_scenes(300, seed=5):
        negative = hard_negative(scene, rng)
        assert negative.caption() != scene.caption()
        assert parse_caption(negative.caption()) == negative  # a valid scene, read back from its caption
        assert negative.background == scene.background
        changed = [(a, b) for a, b in zip(scene.objects, negative.objects) if a != b]
        if all(a.position == b.position for a, b in zip(scene.objects, negative.objects)):
            (a, b), (c, d) = changed  # exactly two objects changed, by swapping their colours
            assert (b.colour, d.colour) == (c.colour, a.colour) and a.colour != c.colour
            assert (a.shape, a.size, a.position) == (b.shape, b.size, b.position)
            kinds["binding"] += 1
        else:
            (a, b), = changed  # one object moved to a position no other object holds
            assert a.position != b.position and (a.shape, a.colour, a.size) == (b.shape, b.colour, b.size)
            assert b.position not in {o.position for o in scene.objects}
            kinds["position"] += 1
    assert kinds["position"] > 100 and kinds["binding"] > 50
