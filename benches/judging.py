"""What the adapter benches share: prompts judged by the Shapes World evaluator, and the texture judgement."""

from __future__ import annotations

import contextlib
import statistics
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

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
    return {**{k: round(statistics.mean(v), 4) for k, v in hits.items()},
            "raw": {k: [int(h) for h in v] for k, v in hits.items()}}  # per judgement, for `studio bench report`


@contextlib.contextmanager
def training_peak(device: str) -> Iterator[dict]:
    """Fills the yielded dict with the peak memory the block added: on CUDA `max_memory_allocated` after a reset; on
    a CPU the process's peak RSS (VmHWM, reset through /proc/self/clear_refs as `studio bench memory` does) above
    its RSS before the block. Where neither can be read, nothing is filled in."""
    out: dict = {}
    cuda = device != "cpu" and torch.cuda.is_available()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        try:
            Path("/proc/self/clear_refs").write_text("5")  # reset the peak-RSS mark
            before = _status_bytes("VmRSS")
        except OSError:
            before = None
    yield out
    if cuda:
        out.update(peak_memory_mb=round((torch.cuda.max_memory_allocated() - before) / 2**20, 1),
                   peak_memory_kind="cuda max allocated above the start")
    elif before is not None:
        out.update(peak_memory_mb=round((_status_bytes("VmHWM") - before) / 2**20, 1),
                   peak_memory_kind="cpu peak rss above the start")


def _status_bytes(key: str) -> int:
    line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith(key))
    return int(line.split()[1]) * 1024
