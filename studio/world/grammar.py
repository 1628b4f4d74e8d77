"""Shapes World scene grammar: the vocabulary, the `Scene` dataclass, captions and the free-text parser.

DESIGN.md section 3. A scene is 1 to 3 objects on a plain background. Each object has a shape, a colour, a size
and a position; the canonical caption is

    a {size} {colour} {shape} on the {position} [and ...] on a {background} background

Users write free text, so `parse_caption` also accepts: no size word (`a red star on the left`), no position
(`a red star`), `in the center` / `at the top` / `in the top left corner`, `an`, `the`, a missing background, and
unknown words such as trigger tokens (`a sks emblem on the left`), which it skips. Unspecified attributes are
`None` and the evaluator does not judge them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from studio.errors import StudioError


if TYPE_CHECKING:
    import numpy as np


SHAPES = ("circle", "square", "triangle", "star", "ring", "cross", "heart", "diamond")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "orange": (255, 140, 0),
    "yellow": (250, 220, 20),
    "green": (30, 160, 50),
    "blue": (30, 70, 230),
    "purple": (140, 40, 190),
    "white": (255, 255, 255),
    "black": (0, 0, 0),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (255, 255, 255),
    "black": (0, 0, 0),
    "gray": (128, 128, 128),
    "beige": (215, 195, 150),
}
SIZES = ("small", "large")
# Anchor of each position in pixels on the 64x64 canvas, (x, y) with y pointing down.
POSITIONS: dict[str, tuple[float, float]] = {
    "center": (32.0, 32.0),
    "left": (15.0, 32.0),
    "right": (49.0, 32.0),
    "top": (32.0, 15.0),
    "bottom": (32.0, 49.0),
    "top left": (15.0, 15.0),
    "top right": (49.0, 15.0),
    "bottom left": (15.0, 49.0),
    "bottom right": (49.0, 49.0),
}
EMBLEM = "emblem"  # the shape word of a seeded emblem (a subject concept, held out of the base)
IMAGE_SIZE = 64

_SYNONYMS = {
    "grey": "gray",
    "centre": "center",
    "middle": "center",
    "violet": "purple",
    "big": "large",
    "little": "small",
    "tiny": "small",
    "squares": "square",
    "circles": "circle",
    "stars": "star",
}
_ARTICLES = {"a", "an", "the", "one"}
_STOP = {"on", "in", "at", "of", "to", "with", "side", "corner", "part", "colored", "coloured", "shaped"}


@dataclass(frozen=True)
class SceneObject:
    """One object. `None` means "not asked for"; `emblem` is the seed of an emblem when `shape == "emblem"`."""

    shape: str
    colour: str | None = None
    size: str | None = None
    position: str | None = None
    emblem: int | None = None
    texture: str | None = None  # fill style; None or "solid" is a plain fill

    def __post_init__(self) -> None:
        if self.shape not in SHAPES and self.shape != EMBLEM:
            raise StudioError(f"unknown shape {self.shape!r}; use one of {', '.join(SHAPES)} or 'emblem'")
        if self.colour is not None and self.colour not in COLOURS:
            raise StudioError(f"unknown colour {self.colour!r}; use one of {', '.join(COLOURS)}")
        if self.size is not None and self.size not in SIZES:
            raise StudioError(f"unknown size {self.size!r}; use 'small' or 'large'")
        if self.position is not None and self.position not in POSITIONS:
            raise StudioError(f"unknown position {self.position!r}; use one of {', '.join(POSITIONS)}")

    def phrase(self) -> str:
        words = [w for w in (self.size, self.colour, self.shape) if w]
        text = ("an " if words[0][0] in "aeiou" else "a ") + " ".join(words)
        return text + (f" on the {self.position}" if self.position else "")


@dataclass(frozen=True)
class Scene:
    """A scene: up to 3 objects and a background (None: not asked for)."""

    objects: tuple[SceneObject, ...]
    background: str | None = None
    texture: str | None = field(default=None)  # a style applied to every object, for texture concepts

    def __post_init__(self) -> None:
        if not 1 <= len(self.objects) <= 3:
            raise StudioError(f"a scene has 1 to 3 objects, got {len(self.objects)}; shorten the prompt")
        if self.background is not None and self.background not in BACKGROUNDS:
            raise StudioError(f"unknown background {self.background!r}; use one of {', '.join(BACKGROUNDS)}")

    def caption(self) -> str:
        """The canonical caption, e.g. `a large red star on the left on a white background`."""
        text = " and ".join(o.phrase() for o in self.objects)
        return text + (f" on a {self.background} background" if self.background else "")

    def is_complete(self) -> bool:
        """True when every attribute is given (a scene that can be rendered exactly)."""
        return self.background is not None and all(
            o.size and o.position and (o.colour or o.shape == EMBLEM) for o in self.objects
        )

    def with_defaults(self) -> Scene:
        """Fill unspecified attributes with fixed defaults so the scene can be rendered."""
        free = [p for p in ("center", "left", "right", "top", "bottom") if p not in {o.position for o in self.objects}]
        objects = []
        for o in self.objects:
            pos = o.position or free.pop(0)
            objects.append(
                replace(
                    o, size=o.size or "large", position=pos, colour=o.colour or (None if o.shape == EMBLEM else "red")
                )
            )
        return replace(self, objects=tuple(objects), background=self.background or "white")


def _tokens(text: str) -> list[str]:
    words = re.findall(r"[a-z]+", text.lower())
    return [_SYNONYMS.get(w, w) for w in words]


def parse_caption(text: str) -> Scene:
    """Parse a canonical caption or a free variant into a `Scene` (caption -> parse -> caption is the identity)."""
    words = _tokens(text)
    if not words:
        raise StudioError("empty prompt; describe a scene, e.g. 'a large red star on the left on a white background'")
    background = None
    # `... on a gray background` / `gray background`: the colour word right before "background".
    for i, w in enumerate(words):
        if w == "background":
            if i == 0 or words[i - 1] not in BACKGROUNDS:
                raise StudioError(f"unknown background in {text!r}; use one of {', '.join(BACKGROUNDS)}")
            background = words[i - 1]
            words = words[: i - 1] + words[i + 1 :]
            break
    objects: list[SceneObject] = []
    current: dict[str, object] = {}

    def flush() -> None:
        if current:
            if "shape" not in current:
                raise StudioError(f"an object in {text!r} has no shape; name one of {', '.join(SHAPES)}")
            objects.append(SceneObject(**current))  # type: ignore[arg-type]
            current.clear()

    i = 0
    while i < len(words):
        w = words[i]
        two = " ".join(words[i : i + 2])
        if w == "and" or ((w in _ARTICLES) and "shape" in current and "position" in current):
            flush()
        elif two in POSITIONS and " " in two:
            current["position"] = two
            i += 1
        elif w in POSITIONS:
            current["position"] = w
        elif w in SIZES:
            current["size"] = w
        elif w in COLOURS:
            if "shape" in current and "position" in current:
                flush()
            current["colour"] = w
        elif w in SHAPES or w == EMBLEM:
            if "shape" in current:
                flush()
            current["shape"] = w
        i += 1
    flush()
    if not objects:
        raise StudioError(f"no object found in {text!r}; name a shape ({', '.join(SHAPES)}) or 'emblem'")
    positions = [o.position for o in objects if o.position]
    if len(positions) != len(set(positions)):
        raise StudioError(f"two objects share a position in {text!r}; give each object its own place")
    return Scene(objects=tuple(objects), background=background)


def _place_phrases(position: str) -> list[str]:
    """Ways users say a position; every one parses back to `position`."""
    if position == "center":
        return ["on the center", "in the center", "in the middle", "at the centre"]
    if " " in position:  # a corner
        return [f"on the {position}", f"in the {position} corner", f"at the {position}"]
    if position in ("left", "right"):
        return [f"on the {position}", f"on the {position} side", f"to the {position}"]
    return [f"on the {position}", f"at the {position}", f"at the {position} of the picture"]


def free_caption(scene: Scene, rng: np.random.Generator) -> str:
    """A free phrasing of `scene` that differs from its caption, the small variations users write.

    Per object: the size word may go, the position may be said differently (`in the center`, `at the top`, `in
    the top left corner`) and, for a lone object, left out; the background clause may be reworded or left out.
    `parse_caption` of the result gives the scene with the dropped attributes `None` and the rest unchanged.
    """
    for _ in range(20):
        phrases = []
        for o in scene.objects:
            words = [w for w in (None if rng.random() < 0.4 else o.size, o.colour, o.shape) if w]
            text = ("an " if words[0][0] in "aeiou" else "a ") + " ".join(words)
            if o.position and not (len(scene.objects) == 1 and rng.random() < 0.3):
                text += " " + str(rng.choice(_place_phrases(o.position)))
            phrases.append(text)
        # ", " only separates objects that all have a position (the parser splits at the next article).
        text = phrases[0]
        for phrase in phrases[1:]:
            text += str(rng.choice([" and ", ", "])) if all(o.position for o in scene.objects) else " and "
            text += phrase
        bg = scene.background
        if bg and rng.random() < 0.7:
            text += str(rng.choice([f" on a {bg} background", f", {bg} background", f" with a {bg} background"]))
        if rng.random() < 0.2:
            text = text[0].upper() + text[1:]
        if text != scene.caption():
            return text
    return scene.caption().replace(f" on a {bg} background", "") if bg else scene.caption().upper()
