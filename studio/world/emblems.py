"""Emblems: composite glyphs generated from a seed, the *subject* concepts of Shapes World (DESIGN.md section 3).

An emblem is an outer shape, a smaller inner shape of another colour, and a centre dot, e.g. a yellow star inside a
purple ring with a red dot. The same seed always gives the same glyph; it renders at any position, size and
background. Distractors of an emblem are 20 other seeded glyphs, all different from it and from each other.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from studio.world.grammar import SHAPES


CHROMATIC = ("red", "orange", "yellow", "green", "blue", "purple")
INNER_SCALE, DOT_SCALE = 0.5, 0.2
NUM_DISTRACTORS = 20
_DISTRACTOR_STREAM = 0xD157


@dataclass(frozen=True)
class Emblem:
    seed: int
    outer: str
    outer_colour: str
    inner: str
    inner_colour: str
    dot_colour: str

    def glyph(self) -> tuple[str, str, str, str, str]:
        return (self.outer, self.outer_colour, self.inner, self.inner_colour, self.dot_colour)

    def describe(self) -> str:
        return (
            f"a {self.inner_colour} {self.inner} inside a {self.outer_colour} {self.outer} "
            f"with a {self.dot_colour} dot"
        )


def emblem(seed: int) -> Emblem:
    """The emblem of a seed (deterministic)."""
    rng = np.random.default_rng([0xE3B, int(seed)])
    outer = str(rng.choice([s for s in SHAPES if s not in ("cross", "triangle")]))
    inner = str(rng.choice([s for s in SHAPES if s != outer and s != "ring"]))
    c1 = str(rng.choice(CHROMATIC))
    c2 = str(rng.choice([c for c in (*CHROMATIC, "white", "black") if c != c1]))
    c3 = str(rng.choice([c for c in (*CHROMATIC, "white", "black") if c != c2]))
    return Emblem(int(seed), outer, c1, inner, c2, c3)


def distractors(seed: int, n: int = NUM_DISTRACTORS) -> list[int]:
    """`n` emblem seeds whose glyphs differ from `seed`'s and from each other (deterministic)."""
    rng = np.random.default_rng([_DISTRACTOR_STREAM, int(seed)])
    seen = {emblem(seed).glyph()}
    out: list[int] = []
    while len(out) < n:
        s = int(rng.integers(1 << 30, 1 << 31))
        g = emblem(s).glyph()
        if g not in seen:
            seen.add(g)
            out.append(s)
    return out
