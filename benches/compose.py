"""`studio bench compose`: every composer on the same Shapes World pairs, scored by the evaluator, side by side.

`--prepare` trains and caches a fixed seeded set (4 emblem and 2 texture DreamBooth-LoRA adapters) in the bench's own
library. Scoring covers two categories, every pair x `--seeds` seeds: two subjects (two emblems, left and right)
and subject + style (an emblem in a texture). Per composer: composition success (both concepts present, in place,
neither duplicated nor blended: the evaluator's `composition_success`), subject fidelity, prompt fidelity and time
per image as a ratio to single-adapter generation measured in the same run (a composer's set-up, such as CMLoRA's
Fourier profiling, is reported apart); control rows "each adapter alone" and "no adapter". `--category` scores one
category, and `--prepare` then trains only the adapters its pairs use. Writes `compose-bench.md` (the table),
`compose-bench.json` and `compose-bench-grid.png`.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from benches.figures import save_grid
from studio.models import DEFAULT_MODEL


EMBLEM_SEEDS = (101, 202, 303, 404)  # fixed subjects (not training seeds of anything else)
TEXTURE_NAMES = ("stripes", "checker")  # fixed styles
EMBLEM_TRIGGERS = ("sks", "zwx", "qrv", "pkt")
TEXTURE_TRIGGERS = ("vgl", "xzn")
CONTROLS = ("alone", "none")
CATEGORIES = ("two_subjects", "subject_style")


@dataclass(frozen=True)
class Case:
    category: str  # two_subjects | subject_style
    prompt: str  # with the adapters' triggers
    caption: str  # the same scene in plain words, as the evaluator reads it
    adapters: tuple[str, ...]
    emblems: tuple[int, ...]  # the emblem seed of each emblem object, in prompt order
    texture: str | None


def adapter_names() -> dict[str, tuple[str, dict]]:
    """Library name -> (trigger, TrainConfig source fields) of the bench's fixed adapter set."""
    out = {f"bench-emblem-{s}": (t, {"world_emblem": s}) for s, t in zip(EMBLEM_SEEDS, EMBLEM_TRIGGERS)}
    out.update({f"bench-texture-{n}": (t, {"world_texture": n}) for n, t in zip(TEXTURE_NAMES, TEXTURE_TRIGGERS)})
    return out


def cases() -> list[Case]:
    names = adapter_names()
    emblem = [(n, t, src["world_emblem"]) for n, (t, src) in names.items() if "world_emblem" in src]
    texture = [(n, t, src["world_texture"]) for n, (t, src) in names.items() if "world_texture" in src]
    pair = "a large {} emblem on the left and a large {} emblem on the right on a white background"
    styled = "a large {} emblem in the center on a white background{}"
    out = [
        Case("two_subjects", pair.format(ta, tb), pair.format("", "").replace("  ", " "), (a, b), (sa, sb), None)
        for (a, ta, sa), (b, tb, sb) in itertools.combinations(emblem, 2)
    ]
    out += [
        Case("subject_style", styled.format(te, f" in {tt} style"), styled.format("", "").replace("  ", " "), (e, x),
             (se,), name)
        for (e, te, se), (x, tt, name) in itertools.product(emblem, texture)
    ]
    return out


def needed(categories: list[str] | None = None, pairs: int | None = None) -> list[str]:
    """The adapters the chosen cases use (`pairs` per category, as `run_bench` picks them), in set order."""
    chosen = [c for cat in CATEGORIES if cat in (categories or CATEGORIES)
              for c in [c for c in cases() if c.category == cat][:pairs]]
    return [n for n in adapter_names() if any(n in c.adapters for c in chosen)]


def prepare(model: str, library: Path, steps: int | None, names: list[str] | None = None) -> list[str]:
    """Train (or find cached) the fixed adapter set, or its `names`, in `library`; returns the names trained now."""
    from studio.library import Library
    from trainers import TrainConfig, train

    lib, made = Library(library), []
    for name, (trigger, source) in adapter_names().items():
        if name in lib or (names is not None and name not in names):
            continue
        options = {"train_steps": steps} if steps else {}
        run_dir = str(library / ".runs" / name)  # an interrupted preparation starts that adapter over
        config = TrainConfig(trigger=trigger, name=name, model=model, seed=0, run_dir=run_dir, overwrite=True,
                             progress=False, **source, **options)
        train("dreambooth_lora", config, library=lib)
        made.append(name)
    return made


def _scene(case: Case):  # -> Scene with the asked emblem seeds
    from studio.world.grammar import EMBLEM, parse_caption

    scene = parse_caption(case.caption)
    seeds = iter(case.emblems)
    objects = tuple(replace(o, emblem=next(seeds)) if o.shape == EMBLEM else o for o in scene.objects)
    return replace(scene, objects=objects)


def score_image(image: torch.Tensor, case: Case) -> dict[str, float]:
    """The evaluator's composition success, subject fidelity and prompt fidelity of one image."""
    from studio.world.evaluator import evaluate

    r = evaluate(image, _scene(case), texture=case.texture)
    return {"composition_success": float(r["composition_success"]), "subject_fidelity": r["subject_fidelity"] or 0.0,
            "prompt_fidelity": r["prompt_fidelity"]}


def run_bench(
    model: str, library: Path, composers_: list[str], seeds: int, steps: int, out: Path, pairs: int | None = None,
    categories: list[str] | None = None,
) -> dict:
    """Score every composer and the control rows on every case x seed; write the table, JSON and grid."""
    from tqdm import tqdm

    import composers
    from studio.generate import GenerateConfig, cached_pipeline, generate
    from studio.library import Library, load_adapters, loaded_adapters, unload_adapters

    os.environ["STUDIO_LIBRARY"] = str(library)  # generation resolves adapters in the bench's library
    lib = Library(library)
    missing = [n for n in needed(categories, pairs) if n not in lib]
    if missing:
        from studio.errors import StudioError

        raise StudioError(f"the bench's adapters are not trained ({missing[0]}, ...); run with --prepare first")
    began = time.perf_counter()
    pipe = cached_pipeline(model, "cpu")
    rows = [*composers_, *CONTROLS]
    figures: dict[str, dict[str, list[float]]] = {r: {"composition_success": [], "subject_fidelity": [],
                                                       "prompt_fidelity": [], "seconds": [], "install": []}
                                                   for r in rows}
    grid: dict[str, list[torch.Tensor]] = {r: [] for r in rows}
    by_category = {cat: [c for c in cases() if c.category == cat] for cat in CATEGORIES
                   if cat in (categories or CATEGORIES)}
    chosen = [c for group in by_category.values() for c in group[:pairs]]
    bar = tqdm(total=len(chosen) * len(rows), desc="compose bench", unit="row")
    for case in chosen:
        pair = composers.AdapterSet(list(case.adapters), [1.0] * len(case.adapters))
        runs = {c: lambda c=c: composers.apply(pipe, pair, c) for c in composers_}
        # One batch of every seed per row (image i has seed i, as alone); "none" first, with nothing loaded; then
        # the pair is loaded once and every other row activates only its own adapters.
        config = GenerateConfig(prompt=case.prompt, model=model, seed=0, steps=steps, num_images=seeds)
        for row in ["none", *(r for r in rows if r != "none")]:
            if row != "none" and not loaded_adapters(pipe):
                load_adapters(pipe, pair.names, pair.weights, library=lib)
            for names in [None] if row != "alone" else [[a] for a in case.adapters]:
                installed = time.perf_counter()
                if row in runs:
                    handle = runs[row]()  # a composer's set-up (e.g. CMLoRA's cached profiling) is timed apart
                elif names:
                    handle = composers.apply(pipe, composers.AdapterSet(names, [1.0]), "merge")
                else:
                    handle = None
                try:  # timed: generation with the composer installed (loading is not the composer's cost)
                    start = time.perf_counter()
                    figures[row]["install"].append(start - installed)
                    images = generate(config, pipe=pipe, output_type="pt").images  # (seeds, 3, H, W) in [0, 1]
                    figures[row]["seconds"].append((time.perf_counter() - start) / seeds)
                finally:
                    if handle is not None:
                        handle.remove()
                for image in images:
                    for key, value in score_image(image, case).items():
                        figures[row][key].append(value)
                if names is None or names[0] == case.adapters[0]:
                    grid[row].append(images[0])  # one tile per case and row ("alone": the pair's first adapter)
            bar.update()
        unload_adapters(pipe)
    bar.close()
    single = statistics.median(figures["alone"]["seconds"])
    table = {
        row: {key: round(statistics.mean(v), 4) for key, v in f.items() if key not in ("seconds", "install")}
        | {"time_ratio": round(statistics.median(f["seconds"]) / single, 3),
           "install_seconds": round(max(f["install"]), 3)}
        for row, f in figures.items()
    }
    report = {"model": model, "steps": steps, "seeds": seeds, "cases": len(chosen), "categories": list(by_category),
              "threads": torch.get_num_threads(), "single_adapter_s_per_image": round(single, 4), "rows": table,
              "scoring_seconds": round(time.perf_counter() - began, 1)}
    _write(out, report, grid, rows)
    return report


def _write(out: Path, report: dict, grid: dict[str, list[torch.Tensor]], rows: list[str]) -> None:

    from studio.atomic import write_json, write_text

    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "compose-bench.json", report)
    head = (
        "| row | composition success | subject fidelity | prompt fidelity | time / single adapter |\n"
        "|---|---|---|---|---|\n"
    )
    body = "".join(
        f"| {r} | {v['composition_success']:.3f} | {v['subject_fidelity']:.3f} | {v['prompt_fidelity']:.3f} | "
        f"{v['time_ratio']:.2f}x |\n"
        for r, v in report["rows"].items()
    )
    note = (f"\n{report['cases']} pairs x {report['seeds']} seeds, {report['steps']} steps, {report['threads']} "
            f"threads; 'alone' averages each adapter of the pair on its own; single adapter "
            f"{report['single_adapter_s_per_image']} s/image; scoring took {report['scoring_seconds']:.0f} s; "
            f"categories: {', '.join(report['categories'])}; longest set-up outside the timing (e.g. CMLoRA's "
            f"profiling, once per adapter): "
            + ", ".join(f"{r} {v['install_seconds']:.1f} s" for r, v in report["rows"].items()) + ".\n")
    write_text(out / "compose-bench.md", head + body + note)
    save_grid(out / "compose-bench-grid.png", [grid[r] for r in rows])


def run(args: argparse.Namespace) -> int:
    import composers

    library = Path(args.library)
    if args.prepare:
        prepare(args.model, library, args.train_steps, needed(args.category, args.pairs))
    if args.autolora_gate_steps:  # AutoLoRA's gates, trained on the bench's adapters and shipped for the base
        from composers.autolora_train import train_gate
        from studio.generate import cached_pipeline
        from studio.library import Library

        train_gate(cached_pipeline(args.model, "cpu"), list(adapter_names()), steps=args.autolora_gate_steps,
                   library=Library(library))
    report = run_bench(args.model, library, args.composer or list(composers.COMPOSERS), args.seeds, args.steps,
                       Path(args.out), pairs=args.pairs, categories=args.category)
    print(json.dumps(report, indent=2))
    return 0


def register_bench(benches: argparse._SubParsersAction) -> None:
    parser = benches.add_parser("compose", help="composers side by side on Shapes World pairs (table and grid)")
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--prepare", action="store_true", help="train the fixed adapter set first (cached)")
    parser.add_argument("--train-steps", type=int, default=None, help="steps per adapter (default the method's)")
    parser.add_argument("--library", default="bench-out/compose/library", help="the bench's own adapter library")
    parser.add_argument("--composer", action="append", help="a composer to score (repeatable; default all)")
    parser.add_argument("--seeds", type=int, default=8, help="seeds per pair")
    parser.add_argument("--pairs", type=int, default=None, help="pairs per category (default all: 6 and 8)")
    parser.add_argument("--steps", type=int, default=20, help="sampling steps")
    parser.add_argument("--category", action="append", choices=CATEGORIES,
                        help="a category of pairs to score (repeatable; default both); --prepare trains what it needs")
    parser.add_argument("--autolora-gate-steps", type=int, default=0,
                        help="train AutoLoRA's gates on the bench's adapters first, this many steps (0: the shipped)")
    parser.add_argument("--out", default="bench-out/compose")
    parser.set_defaults(func=run)
