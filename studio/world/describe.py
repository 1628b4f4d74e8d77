"""A concept's look in words: the phrasings of emblems and textures that retrieval is trained and judged on.

An emblem is named by its glyph (`a yellow star inside a purple ring with a red dot`, `Emblem.describe`), a texture
by its pattern (`diagonal stripes`), never by a trigger word. Phrasings come in two disjoint template sets: `train`
(what a retriever learns from, the role of AutoLoRA's three VLM captions per adapter, arXiv:2508.02107 section 3.1)
and `eval` (other wordings, word orders and scene contexts, the prompts a retriever is judged on).
"""

from __future__ import annotations

import numpy as np

from studio.errors import StudioError
from studio.world.emblems import emblem
from studio.world.textures import TEXTURES


# What each texture looks like (studio.world.textures.shade_map), in plain words.
TEXTURE_LOOKS = {
    "stripes": "diagonal stripes",
    "dots": "polka dots",
    "checker": "a checkerboard pattern",
    "grid": "a grid of thin lines",
    "gradient": "a gradient from bright at the top to dark at the bottom",
    "waves": "wavy bands",
    "concentric": "concentric circles like a target",
}
_PLACES = ("on the left", "on the right", "on the top", "on the bottom", "in the center")
_BACKGROUNDS = ("white", "black", "gray", "beige")
_OBJECTS = ("red circle", "blue star", "green square", "orange heart", "purple diamond", "yellow triangle")

_EMBLEM_TEMPLATES = {
    "train": (
        "{desc}",
        "an emblem of {desc}",
        "a large emblem, {desc}, {place} on a {bg} background",
        "a badge: {desc}",
        "a {oc} {o} around a {ic} {i} and a {dc} dot",
        "{ic} {i}, {oc} {o}, {dc} dot",
        "an icon where a {ic} {i} sits inside a {oc} {o}, plus a {dc} dot",
        "the emblem, {desc}, drawn large {place}",
    ),
    "eval": (
        "a logo showing {desc}",
        "a small emblem with {desc} {place} on a {bg} background",
        "a {oc} {o} with a {ic} {i} in it and a {dc} dot in the middle",
        "symbol of a {ic} {i} within a {oc} {o}, {dc} dot at its center",
    ),
}
_TEXTURE_TEMPLATES = {
    "train": (
        "{look}",
        "shapes filled with {look}",
        "a large {obj} with {look} {place} on a {bg} background",
        "a style of {look}",
        "a {obj} in {look}",
        "an image where every shape has {look}",
        "{look} texture on a {bg} background",
        "the fill is {look}",
    ),
    "eval": (
        "a pattern of {look}",
        "a {obj} painted with {look}",
        "everything covered in {look} on a {bg} background",
        "objects textured with {look}",
    ),
}


def texture_look(name: str) -> str:
    if name not in TEXTURE_LOOKS:
        raise StudioError(f"unknown texture {name!r}; use one of {', '.join(TEXTURES[1:])}")
    return TEXTURE_LOOKS[name]


def concept_text(*, world_emblem: int | None = None, world_texture: str | None = None) -> str:
    """The plain description of one Shapes World concept."""
    if world_emblem is not None:
        return emblem(int(world_emblem)).describe()
    if world_texture is not None:
        return texture_look(world_texture)
    raise StudioError("give an emblem seed or a texture name")


def phrasings(
    *, world_emblem: int | None = None, world_texture: str | None = None, split: str = "train", seed: int = 0
) -> list[str]:
    """One prompt per template of `split` (train | eval) naming the concept's look; scene words drawn from `seed`."""
    if split not in ("train", "eval"):
        raise StudioError(f"split {split!r}: use train or eval")
    rng = np.random.default_rng([0xD35C, seed, 0 if split == "train" else 1])
    words = {"place": "", "bg": "", "obj": ""}
    out = []
    templates = _EMBLEM_TEMPLATES[split] if world_emblem is not None else _TEXTURE_TEMPLATES[split]
    for template in templates:
        words = {"place": str(rng.choice(_PLACES)), "bg": str(rng.choice(_BACKGROUNDS)),
                 "obj": str(rng.choice(_OBJECTS))}
        if world_emblem is not None:
            e = emblem(int(world_emblem))
            words |= {"desc": e.describe(), "o": e.outer, "oc": e.outer_colour, "i": e.inner, "ic": e.inner_colour,
                      "dc": e.dot_colour}
        else:
            words["look"] = texture_look(str(world_texture))
        out.append(template.format(**words))
    return out
