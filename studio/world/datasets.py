"""Seeded Shapes World datasets: base training scenes, concept datasets (emblems, textures), evaluation splits.

Every draw comes from `numpy.random.default_rng([stream, split, seed])`; the "train" and "eval" splits use
different streams, so evaluation scenes and jitters never reuse a training seed. Objects in a sampled scene never
overlap: two anchors are at least the sum of both (jittered) radii plus a margin apart.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
import torch

from studio.errors import StudioError
from studio.world.emblems import CHROMATIC
from studio.world.grammar import BACKGROUNDS, COLOURS, EMBLEM, POSITIONS, SHAPES, SIZES, Scene, SceneObject
from studio.world.renderer import EMBLEM_RADIUS, JITTER_PX, JITTER_SCALE, RADIUS, render
from studio.world.textures import TEXTURES


SPLITS = {"train": 1, "eval": 2, "calib": 3}
_MARGIN = 1.0


@dataclass
class WorldBatch:
    images: torch.Tensor  # (B, 3, 64, 64) in [0, 1]
    captions: list[str]
    scenes: list[Scene]
    seeds: list[int]  # render seeds (jitter)


def _rng(stream: int, split: str, seed: int) -> np.random.Generator:
    if split not in SPLITS:
        raise StudioError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}")
    return np.random.default_rng([stream, SPLITS[split], int(seed)])


def render_seed(split: str, seed: int, i: int) -> int:
    """The jitter seed of the i-th scene of a split/seed: disjoint ranges per split."""
    return SPLITS[split] * (1 << 40) + int(seed) * (1 << 20) + i


def _fits(pos: str, r: float, placed: list[tuple[str, float]]) -> bool:
    ax, ay = POSITIONS[pos]
    for p2, r2 in placed:
        bx, by = POSITIONS[p2]
        reach = (r + r2) * (1 + JITTER_SCALE) + 2 * math.sqrt(2) * JITTER_PX + _MARGIN
        if math.hypot(ax - bx, ay - by) < reach:
            return False
    return True


def random_scene(
    rng: np.random.Generator,
    n_objects: int,
    emblem_seed: int | None = None,
    texture: str | None = None,
    background: str | None = None,
    sizes: tuple[str, ...] = SIZES,
) -> Scene:
    """One non-overlapping scene; with `emblem_seed`, the first object is that emblem."""
    for _ in range(100):
        bg = background or str(rng.choice(list(BACKGROUNDS)))
        placed: list[tuple[str, float]] = []
        objects = []
        for k in range(n_objects):
            is_emblem = emblem_seed is not None and k == 0
            size = str(rng.choice(sizes))
            r = (EMBLEM_RADIUS if is_emblem else RADIUS)[size]
            free = [p for p in POSITIONS if _fits(p, r, placed)]
            if not free:
                break
            pos = str(rng.choice(free))
            placed.append((pos, r))
            if is_emblem:
                objects.append(SceneObject(EMBLEM, None, size, pos, emblem=emblem_seed))
                continue
            palette = CHROMATIC if texture else [c for c in COLOURS if c != bg]
            objects.append(SceneObject(str(rng.choice(SHAPES)), str(rng.choice(palette)), size, pos))
        if len(objects) == n_objects:
            return Scene(tuple(objects), bg, texture=texture)
    raise StudioError(f"could not place {n_objects} objects without overlap; ask for fewer objects")


def sample_scenes(n: int, seed: int, split: str = "train", objects: tuple[int, int] = (1, 3)) -> list[Scene]:
    """`n` complete random scenes with `objects[0]..objects[1]` objects each (base training and evaluation)."""
    rng = _rng(0xBA5E, split, seed)
    lo, hi = objects
    return [random_scene(rng, int(rng.integers(lo, hi + 1))) for _ in range(n)]


def world_batch(
    n: int, seed: int, split: str = "train", objects: tuple[int, int] = (1, 3), device: str = "cpu"
) -> WorldBatch:
    """Scenes, their renders and exact captions: the base's (and the world CLIP's) training data."""
    scenes = sample_scenes(n, seed, split, objects)
    seeds = [render_seed(split, seed, i) for i in range(n)]
    return WorldBatch(render(scenes, seeds, device), [s.caption() for s in scenes], scenes, seeds)


def emblem_dataset(
    emblem_seed: int, n: int, seed: int = 0, split: str = "train", objects: tuple[int, int] = (1, 1)
) -> WorldBatch:
    """`n` renders of one emblem in new places, sizes and backgrounds (a subject concept's training images).

    Captions name the emblem with the word `emblem`; a trainer substitutes its trigger (`a sks emblem ...`).
    """
    rng = _rng(0xE3B1, split, seed * 7919 + int(emblem_seed))
    scenes = [
        random_scene(rng, int(rng.integers(objects[0], objects[1] + 1)), emblem_seed=emblem_seed) for _ in range(n)
    ]
    seeds = [render_seed(split, seed, 500_000 + i) for i in range(n)]
    return WorldBatch(render(scenes, seeds), [s.caption() for s in scenes], scenes, seeds)


def texture_dataset(
    name: str, n: int, seed: int = 0, split: str = "train", objects: tuple[int, int] = (1, 2)
) -> WorldBatch:
    """`n` scenes all in one texture: large chromatic objects on any background (a style concept's images).

    Black backgrounds are in: an adapter trained without them (20 scenes) kept the texture off black in the adapter
    bench (75% found, every miss but one on black), although its renders there are as readable as on the others.
    Captions are the plain scene captions; a trainer appends its trigger (`... in sks style`).
    """
    if name not in TEXTURES or name == "solid":
        raise StudioError(f"unknown texture {name!r}; use one of {', '.join(TEXTURES[1:])}")
    rng = _rng(0x7E47, split, seed * 131 + TEXTURES.index(name))
    scenes = [
        random_scene(
            rng,
            int(rng.integers(objects[0], objects[1] + 1)),
            texture=name,
            sizes=("large",),
        )
        for _ in range(n)
    ]
    seeds = [render_seed(split, seed, 700_000 + i) for i in range(n)]
    return WorldBatch(render(scenes, seeds), [s.caption() for s in scenes], scenes, seeds)


SOLID_SHAPES = ("circle", "square", "triangle", "star", "heart", "diamond")  # wide enough to show a texture


def textured_object(texture: str, emblem_seed: int | None = None) -> SceneObject:
    """The textured object of a one-image concept (B-LoRA's content + style): the emblem filled with `texture`, or
    without an emblem a plain shape and colour drawn from the texture's name (the same for every call)."""
    if texture not in TEXTURES or texture == "solid":
        raise StudioError(f"unknown texture {texture!r}; use one of {', '.join(TEXTURES[1:])}")
    if emblem_seed is not None:
        return SceneObject(EMBLEM, None, "large", "center", emblem=int(emblem_seed), texture=texture)
    rng = _rng(0x0B1E, "train", TEXTURES.index(texture))
    return SceneObject(str(rng.choice(SOLID_SHAPES)), str(rng.choice(CHROMATIC)), "large", "center", texture=texture)


def textured_object_dataset(texture: str, n: int, emblem_seed: int | None = None, seed: int = 0,
                            split: str = "train") -> WorldBatch:
    """`n` renders of one textured object: the first large in the center on white, the rest in random places,
    sizes and backgrounds. Captions are the plain scene captions (the object's own words: a trainer replaces them)."""
    obj = textured_object(texture, emblem_seed)
    rng = _rng(0x0B1F, split, seed * 131 + TEXTURES.index(texture) + 17 * int(emblem_seed or 0))
    scenes = [Scene((obj,), "white")]
    for _ in range(n - 1):
        placed = random_scene(rng, 1, emblem_seed=0)  # one emblem-sized place: fits any object
        where = placed.objects[0]
        scenes.append(Scene((replace(obj, size=where.size, position=where.position),), placed.background))
    seeds = [render_seed(split, seed, 900_000 + i) for i in range(n)]
    return WorldBatch(render(scenes, seeds), [s.caption() for s in scenes], scenes, seeds)
