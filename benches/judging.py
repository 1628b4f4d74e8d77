"""What the adapter benches share: prompts judged by the Shapes World evaluator, and the texture judgement."""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import dataclass

import torch


PLACES = ("left", "right", "top", "bottom", "center")  # the grammar's named positions (corners are optional)
GenerateFn = Callable[[list[str], list[int]], list[torch.Tensor]]  # prompts, seeds -> (3, H, W) each, in [0, 1]
BATCH = 10  # images per generation batch (the same images as one at a time, in about half the time)


@dataclass(frozen=True)
class Prompt:
    text: str  # with the trigger
    scene: object  # studio.world.grammar.Scene the evaluator judges against
    seed: int


def texture_prompts(name: str, trigger: str, n: int = 20) -> list[Prompt]:
    """`n` new one- or two-object scenes from the evaluation split, written `... in {trigger} style`.

    Objects are large, as in the texture's training scenes: a small textured object is unreadable through the VAE
    (perfect renders of small ones, round-tripped, keep their shape in 74% of objects), so no adapter could show it.
    Backgrounds are any of the four.
    """
    from studio.world.datasets import _rng, random_scene

    rng = _rng(0x7E48, "eval", 0)
    out = []
    for i in range(n):
        scene = random_scene(rng, int(rng.integers(1, 3)), texture=name, sizes=("large",))
        out.append(Prompt(f"{scene.caption()} in {trigger} style", scene, i))
    return out


def judge_texture(images: list[torch.Tensor], prompts: list[Prompt], name: str) -> dict[str, float]:
    from studio.world.evaluator import evaluate

    hits: dict[str, list[bool]] = {"texture": [], "shape": [], "colour": [], "position": []}
    for image, p in zip(images, prompts):
        r = evaluate(image, p.scene, texture=name)
        hits["texture"].append(bool(r["style_fidelity"]))
        for o in r["objects"]:
            for k in ("shape", "colour", "position"):
                hits[k].append(bool(o[k]))
    return {k: round(statistics.mean(v), 4) for k, v in hits.items()}
