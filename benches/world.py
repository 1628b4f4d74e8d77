"""`studio bench world`: the evaluator's calibration figures, emblem/texture decisions and world-CLIP retrieval.

All sets are drawn from the "calib"/"eval" splits, never from training seeds. Figures:
(a) clean renders, (b) the same renders through the shipped VAE, (c) negative controls (one attribute changed;
shuffled image/scene pairs against the chance level, i.e. how often two independent scenes agree);
emblems (VAE round trips found; fresh distractor emblems taken for E); textures (recognised; confused);
world CLIP top-1 retrieval of 100 fresh renders by their exact captions.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import replace

import numpy as np
import torch

from studio.world.datasets import _fits, emblem_dataset, render_seed, sample_scenes, texture_dataset, world_batch
from studio.world.emblems import distractors
from studio.world.evaluator import evaluate
from studio.world.grammar import BACKGROUNDS, COLOURS, POSITIONS, SHAPES, Scene
from studio.world.renderer import EMBLEM_RADIUS, RADIUS, render
from studio.world.textures import TEXTURES


def _mean(xs: list[float]) -> float:
    return float(sum(xs) / max(1, len(xs)))


def _vae_round_trip(images: torch.Tensor) -> torch.Tensor:
    from studio.world.vae import load_vae, round_trip

    return round_trip(images, load_vae())


def altered(scene: Scene, rng: np.random.Generator) -> tuple[Scene, str]:
    """The scene with one attribute changed (shape, colour, size, position or background), still valid."""
    while True:
        kind = str(rng.choice(["shape", "colour", "size", "position", "background"]))
        i = int(rng.integers(len(scene.objects)))
        o = scene.objects[i]
        others = [
            (p.position, (EMBLEM_RADIUS if p.shape == "emblem" else RADIUS)[p.size])
            for j, p in enumerate(scene.objects)
            if j != i
        ]
        if kind == "shape":
            new = replace(o, shape=str(rng.choice([s for s in SHAPES if s != o.shape])))
        elif kind == "colour":
            new = replace(o, colour=str(rng.choice([c for c in COLOURS if c not in (o.colour, scene.background)])))
        elif kind == "size":
            new = replace(o, size="small" if o.size == "large" else "large")
            if not _fits(new.position, RADIUS[new.size], others):
                continue
        elif kind == "position":
            free = [p for p in POSITIONS if p != o.position and _fits(p, RADIUS[o.size], others)]
            if not free:
                continue
            new = replace(o, position=str(rng.choice(free)))
        else:
            used = {p.colour for p in scene.objects}
            bg = [b for b in BACKGROUNDS if b != scene.background and b not in used]
            if not bg:
                continue
            return replace(scene, background=str(rng.choice(bg))), kind
        objs = list(scene.objects)
        objs[i] = new
        return replace(scene, objects=tuple(objs)), kind


def calibration(n: int = 500, use_vae: bool = True) -> dict:
    out: dict[str, object] = {}
    batch = world_batch(n, 0, split="calib")
    res = [evaluate(im, sc) for im, sc in zip(batch.images, batch.scenes)]
    out["a_clean_attribute_agreement"] = _mean([r["attribute_accuracy"] for r in res])
    out["a_clean_all_correct"] = _mean([float(r["all_correct"]) for r in res])
    if use_vae:
        rt = _vae_round_trip(batch.images)
        res = [evaluate(im, sc) for im, sc in zip(rt, batch.scenes)]
        out["b_vae_attribute_agreement"] = _mean([r["attribute_accuracy"] for r in res])
        out["b_vae_all_correct"] = _mean([float(r["all_correct"]) for r in res])
    rng = np.random.default_rng(11)
    changed = [altered(s, rng) for s in batch.scenes]
    images = render([c for c, _ in changed], batch.seeds)
    images = _vae_round_trip(images) if use_vae else images
    caught = [not evaluate(im, sc)["all_correct"] for im, sc in zip(images, batch.scenes)]
    out["c_altered_caught"] = _mean([float(c) for c in caught])
    out["c_altered_caught_by_kind"] = {
        k: _mean([float(c) for c, (_, kk) in zip(caught, changed) if kk == k])
        for k in ("shape", "colour", "size", "position", "background")
    }
    perm = np.roll(np.arange(n), 1)
    shuffled = [evaluate(batch.images[j], batch.scenes[i])["attribute_accuracy"] for i, j in enumerate(perm)]
    out["c_shuffled_attribute_agreement"] = _mean(shuffled)
    out["c_shuffled_chance"] = _mean([_scene_agreement(batch.scenes[i], batch.scenes[j]) for i, j in enumerate(perm)])
    return out


def _scene_agreement(asked: Scene, shown: Scene) -> float:
    """What an oracle judge gives a shuffled pair: the evaluator's matching and checks run on the shown scene's truth.

    Objects are matched greedily by anchor distance (as the evaluator does with component centroids); this is the
    chance level of attribute agreement between an image and an unrelated scene.
    """
    pairs = sorted(
        (math.dist(POSITIONS[a.position], POSITIONS[b.position]), i, j)
        for i, a in enumerate(asked.objects)
        for j, b in enumerate(shown.objects)
    )
    match: dict[int, int] = {}
    for _, i, j in pairs:
        if i not in match and j not in match.values():
            match[i] = j
    items = []
    for i, a in enumerate(asked.objects):
        b = shown.objects[match[i]] if i in match else None
        items += [b is not None] + [
            b is not None and getattr(b, k) == getattr(a, k) for k in ("shape", "colour", "size", "position")
        ]
    items.append(asked.background == shown.background)
    return _mean([float(x) for x in items])


def emblem_figures(n: int = 200, use_vae: bool = True) -> dict:
    """Emblems found and distractors taken at the evaluator's threshold, and the sweep that set it.

    Positives: `n` fresh emblems rendered once each, plus 20 emblems of the calib split at the adapter bench's 20
    placements (large, 5 positions x 4 backgrounds). Negatives: each image judged as another random emblem.
    """
    from studio.world.evaluator import EMBLEM_THRESHOLD
    from studio.world.grammar import EMBLEM, SceneObject

    rng = np.random.default_rng(23)
    pos_scores, neg_scores = [], []  # (score, ranked first) of the asked emblem

    def judge(img: torch.Tensor, scene: Scene, e: int) -> tuple[float, bool]:
        o = evaluate(img, scene, emblem=e)["objects"][0]
        return (o.get("emblem_score") or -9.0), bool(o.get("emblem_first"))

    def fresh(avoid: int) -> int:
        d = int(rng.integers(10_000, 1 << 30))
        while d == avoid or d in distractors(avoid):
            d = int(rng.integers(10_000, 1 << 30))
        return d

    for i in range(n):
        e = int(rng.integers(10_000, 1 << 30))
        d = fresh(e)
        pos, neg = emblem_dataset(e, 1, seed=i, split="eval"), emblem_dataset(d, 1, seed=i, split="eval")
        imgs = torch.cat([pos.images, neg.images])
        imgs = _vae_round_trip(imgs) if use_vae else imgs
        pos_scores.append(judge(imgs[0], pos.scenes[0], e))
        neg_scores.append(judge(imgs[1], neg.scenes[0], e))
    places = [(p, b) for p in ("left", "right", "top", "bottom", "center") for b in BACKGROUNDS]
    for k in range(20):
        e = int(rng.integers(10_000, 1 << 30))
        scenes = [Scene((SceneObject(EMBLEM, None, "large", p, emblem=e),), b) for p, b in places]
        imgs = render(scenes, [render_seed("calib", 5, k * 20 + i) for i in range(len(scenes))])
        imgs = _vae_round_trip(imgs) if use_vae else imgs
        for img, scene in zip(imgs, scenes):
            pos_scores.append(judge(img, scene, e))
            neg_scores.append(judge(img, scene, fresh(e)))

    def rate(scores: list[tuple[float, bool]], t: float) -> float:
        return _mean([float(first and s >= t) for s, first in scores])

    sweep = {
        f"{t:.2f}": {"found": rate(pos_scores, t), "taken": rate(neg_scores, t)} for t in np.arange(0.4, 0.85, 0.05)
    }
    return {
        "emblem_found": rate(pos_scores, EMBLEM_THRESHOLD),
        "emblem_distractor_taken": rate(neg_scores, EMBLEM_THRESHOLD),
        "emblem_threshold": EMBLEM_THRESHOLD,
        "emblem_threshold_sweep": sweep,
        "emblem_n": len(pos_scores),
    }


def texture_figures(per_texture: int = 40, use_vae: bool = True) -> dict:
    names = TEXTURES[1:]
    sets = {t: texture_dataset(t, per_texture, seed=3, split="eval") for t in names}
    if use_vae:
        sets = {t: replace(b, images=_vae_round_trip(b.images)) for t, b in sets.items()}
    recog, confused, per = [], [], {}
    for t, b in sets.items():
        ok = [evaluate(im, sc, texture=t)["style_fidelity"] == 1.0 for im, sc in zip(b.images, b.scenes)]
        per[t] = _mean(ok)
        recog += ok
        for t2 in names:
            if t2 != t:
                confused += [
                    evaluate(im, sc, texture=t2)["style_fidelity"] == 1.0
                    for im, sc in zip(b.images[:10], b.scenes[:10])
                ]
    solid = sample_scenes(per_texture, 9, split="eval", objects=(1, 2))
    simgs = render(solid, [render_seed("eval", 9, i) for i in range(per_texture)])
    simgs = _vae_round_trip(simgs) if use_vae else simgs
    confused += [
        evaluate(im, sc, texture=t)["style_fidelity"] == 1.0 for t in names for im, sc in zip(simgs[:10], solid[:10])
    ]
    return {"texture_recognised": _mean(recog), "texture_confused": _mean(confused), "texture_by_name": per}


def clip_figures(n: int = 100) -> dict:
    from studio.world.clip import retrieval_top1

    b = world_batch(n, 1, split="eval")
    return {"clip_retrieval_top1": retrieval_top1(b.images, b.captions), "clip_n": n}


def run(args: argparse.Namespace) -> int:
    torch.set_num_threads(args.threads)
    start = time.time()
    use_vae = not args.no_vae
    figures = {
        **calibration(args.n, use_vae),
        **emblem_figures(args.n_emblem, use_vae),
        **texture_figures(args.n_texture, use_vae),
    }
    if not args.no_clip:
        figures.update(clip_figures())
    figures["seconds"] = round(time.time() - start, 1)
    print(json.dumps(figures, indent=2))
    return 0


def register_bench(benches: argparse._SubParsersAction) -> None:
    p = benches.add_parser("world", help="evaluator calibration, emblem/texture decisions, world-CLIP retrieval")
    p.add_argument("--n", type=int, default=500, help="scenes per calibration set")
    p.add_argument("--n-emblem", type=int, default=200, help="emblem positives (and as many distractors)")
    p.add_argument("--n-texture", type=int, default=40, help="renders per texture")
    p.add_argument("--no-vae", action="store_true", help="skip the VAE round trips (before the VAE is trained)")
    p.add_argument("--no-clip", action="store_true", help="skip the world-CLIP retrieval figure")
    p.add_argument("--threads", type=int, default=2)
    p.set_defaults(func=run)
