"""`studio bench compose`: every composer on the same Shapes World pairs, scored by the evaluator, side by side.

`--prepare` trains and caches a fixed seeded set (4 emblem and 2 texture DreamBooth-LoRA adapters) in the bench's own
library. Scoring covers three categories, every case x `--seeds` seeds: two subjects (two emblems, left and right),
one subject beside an ordinary object (`a large sks emblem on the left and a small blue circle on the right ...`:
the adapter must not leak into the other object) and subject + style (an emblem in a texture). Per composer and
category: composition success (every concept present, in place, none duplicated or blended: the evaluator's
`composition_success`), for subject + object "both right" (the emblem found and the other object entirely right),
subject fidelity, prompt fidelity, and time per image as a ratio to single-adapter generation measured in the same
run (a composer's set-up, such as CMLoRA's Fourier profiling, is reported apart); control rows "each adapter alone"
and "no adapter". Spatial composers get each emblem's box from its position and size words (`case_boxes`).
`--category` scores some categories, and `--prepare` then trains only the adapters their cases use;
it trains the emblems on renders that also hold another object (`--world-objects 2`, the default; with one-object
renders, `--world-objects 1`, subject + object "both right" fell from 0.50 to 0.08 for the adapter alone and from 1.00
to 0.58 for LoRA-Composer, 2 cases x 6 seeds). Writes
`compose-bench.md` (the table), `compose-bench.json` and `compose-bench-grid.png`.
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
from typing import Any

import torch

from benches.figures import save_grid
from studio.errors import StudioError
from studio.models import DEFAULT_MODEL


EMBLEM_SEEDS = (101, 202, 303, 404)  # fixed subjects (not training seeds of anything else)
TEXTURE_NAMES = ("stripes", "checker")  # fixed styles
EMBLEM_TRIGGERS = ("sks", "zwx", "qrv", "pkt")
TEXTURE_TRIGGERS = ("vgl", "xzn")
# AutoLoRA's gates learn on other concepts than the scored ones (`--autolora-gate-steps`): a gate shipped for the base
# meets adapters it never saw, and so does the bench's.
GATE_EMBLEMS = {"gate-emblem-505": ("bnx", 505), "gate-emblem-606": ("fmq", 606)}
GATE_TEXTURES = {"gate-texture-dots": ("dpy", "dots"), "gate-texture-waves": ("hkw", "waves")}
CONTROLS = ("alone", "none")
CATEGORIES = ("two_subjects", "subject_object", "subject_style")
# Emblems train on renders that hold one other object too (--world-objects): a subject that never saw company
# leaks into, or vanishes beside, the other object of a subject + object prompt (module docstring).
WORLD_OBJECTS = 2
# The ordinary object beside emblem i in the subject + object cases (shape, colour, emblem side).
OBJECTS = (("circle", "blue", "left"), ("square", "red", "right"), ("triangle", "green", "left"),
           ("star", "yellow", "right"))


@dataclass(frozen=True)
class Case:
    category: str  # two_subjects | subject_object | subject_style
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


def gate_adapter_names() -> dict[str, tuple[str, dict]]:
    """The same for the adapters AutoLoRA's gates train on: concepts the scored cases never use."""
    out = {name: (t, {"world_emblem": s}) for name, (t, s) in GATE_EMBLEMS.items()}
    out.update({name: (t, {"world_texture": n}) for name, (t, n) in GATE_TEXTURES.items()})
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
    one = "a large {} emblem on the {} and a small {} {} on the {} on a white background"
    for (e, te, se), (shape, colour, side) in zip(emblem, OBJECTS):
        other = "right" if side == "left" else "left"
        out.append(Case("subject_object", one.format(te, side, colour, shape, other),
                        one.format("", side, colour, shape, other).replace("  ", " "), (e,), (se,), None))
    out += [
        Case("subject_style", styled.format(te, f" in {tt} style"), styled.format("", "").replace("  ", " "), (e, x),
             (se,), name)
        for (e, te, se), (x, tt, name) in itertools.product(emblem, texture)
    ]
    return out


def case_boxes(case: Case) -> dict[str, tuple[float, float, float, float]]:
    """Each emblem adapter's box from its object's position anchor and size (the world's radius plus jitter)."""
    from studio.world.grammar import EMBLEM, IMAGE_SIZE, POSITIONS
    from studio.world.renderer import EMBLEM_RADIUS

    scene = _scene(case)
    emblems = [o for o in scene.objects if o.shape == EMBLEM]
    subjects = [a for a in case.adapters if "emblem" in a]
    boxes = {}
    for name, obj in zip(subjects, emblems):
        x, y = POSITIONS[obj.position or "center"]
        r = EMBLEM_RADIUS[obj.size or "large"] * 1.1 + 1.5  # radius jitter 8% and position jitter 1.5 px
        boxes[name] = tuple(round(min(max(v / IMAGE_SIZE, 0.0), 1.0), 4) for v in (x - r, y - r, x + r, y + r))
    return boxes


def composer_config(composer: str, case: Case, layout: str = "world") -> Any:  # the composer's config
    """The composer's default config, with the case's boxes and prompt where the composer reads them. Boxes: the
    scene's own (`layout="world"`), or read from the prompt's position words as `studio compose` does without
    `--box` (`"prompt"`: `composers.layout`)."""
    import dataclasses

    import composers

    config = composers.make_config(composer)
    if "boxes" in {f.name for f in dataclasses.fields(config)}:
        if layout == "prompt":
            adapters = composers.AdapterSet(list(case.adapters), [1.0] * len(case.adapters)).resolve()
            config = config.with_layout(case.prompt, adapters)
        else:
            config = dataclasses.replace(config, boxes=case_boxes(case))
    return config.for_prompt(case.prompt) if hasattr(config, "for_prompt") else config


def chosen_cases(categories: tuple[str, ...] = CATEGORIES, pairs: int | None = None) -> dict[str, list[Case]]:
    """Category -> its first `pairs` cases (all when None), for the chosen categories."""
    return {cat: [c for c in cases() if c.category == cat][:pairs] for cat in categories}


def needed(categories: tuple[str, ...] = CATEGORIES, pairs: int | None = None) -> list[str]:
    """The adapters the chosen cases use, in set order."""
    used = {n for group in chosen_cases(categories, pairs).values() for c in group for n in c.adapters}
    return [n for n in adapter_names() if n in used]


def prepare(model: str, library: Path, steps: int | None, names: list[str] | None = None,
            overrides: dict | None = None, adapters: dict[str, tuple[str, dict]] | None = None) -> list[str]:
    """Train (or find cached) the fixed adapter set (`adapters`, default `adapter_names()`), or its `names`, in
    `library` (`overrides`: TrainConfig fields beyond the steps, e.g. fewer class images); returns the names trained
    now."""
    from studio.library import Library
    from trainers import TrainConfig, train

    lib, made = Library(library), []
    objects = (overrides or {}).get("world_objects", WORLD_OBJECTS)
    for name, (trigger, source) in (adapters or adapter_names()).items():
        if names is not None and name not in names:
            continue
        if name in lib:
            trained = lib.root / name / "train_config.json"
            try:
                held = json.loads(trained.read_text()).get("world_objects", 1) if trained.is_file() else 1
            except ValueError:  # unreadable: how it was trained is unknown
                held = "unknown"
            if "world_emblem" in source and held != objects:
                raise StudioError(f"{library} holds {name} trained with --world-objects {held}, not {objects}: give "
                                  "another --library, or remove it (studio library remove) to train it again")
            continue
        options = {**(overrides or {}), **({"train_steps": steps} if steps is not None else {})}
        if "world_emblem" in source:
            options["world_objects"] = objects
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
    """The evaluator's composition success, subject and prompt fidelity, and whether every object is right."""
    from studio.world.evaluator import evaluate
    from studio.world.grammar import EMBLEM

    scene = _scene(case)
    r = evaluate(image, scene, texture=case.texture)
    both = all(o["correct"] if s.shape != EMBLEM else o["emblem"] for o, s in zip(r["objects"], scene.objects))
    return {"composition_success": float(r["composition_success"]), "subject_fidelity": r["subject_fidelity"] or 0.0,
            "prompt_fidelity": r["prompt_fidelity"], "both_right": float(both)}


def run_bench(
    model: str, library: Path, composers_: list[str], seeds: int, steps: int, out: Path, pairs: int | None = None,
    categories: tuple[str, ...] = CATEGORIES, controls: tuple[str, ...] = CONTROLS, configure: Any = None,
    timed_only: tuple[str, ...] = (), layout: str = "world",
) -> dict:
    """Score every composer and the `controls` rows on every case x seed; write the table, JSON and grid.

    "alone" is always measured: it is the time ratio's reference. `configure(composer, config)`, when given, returns
    the config a composer runs with (e.g. a variant with its masks off), after `composer_config`. Rows in
    `timed_only` are generated and timed but not judged (`studio bench report` judges the controls once, in their
    own part, and times "alone" beside each composer). The JSON keeps every image's judgements (`raw`) and every
    row's seconds per image (`raw_seconds`) beside the means."""
    from tqdm import tqdm

    import composers
    from studio.generate import GenerateConfig, cached_pipeline, generate
    from studio.library import Library, load_adapters, loaded_adapters, unload_adapters

    os.environ["STUDIO_LIBRARY"] = str(library)  # generation resolves adapters in the bench's library
    lib = Library(library)
    by_category = chosen_cases(categories, pairs)
    chosen = [c for group in by_category.values() for c in group]
    missing = sorted({n for c in chosen for n in c.adapters if n not in lib})
    if missing:
        raise StudioError(f"the bench's adapters are not trained ({missing[0]}, ...); run with --prepare first")
    began = time.perf_counter()
    pipe = cached_pipeline(model, "cpu")
    rows = [*composers_, *dict.fromkeys([*controls, "alone"])]
    keys = ("composition_success", "subject_fidelity", "prompt_fidelity", "both_right")
    figures: dict[str, dict[str, dict[str, list[float]]]] = {
        r: {cat: {k: [] for k in keys} for cat in by_category} for r in rows}
    seconds: dict[str, list[float]] = {r: [] for r in rows}
    install: dict[str, list[float]] = {r: [] for r in rows}
    grid: dict[str, list[torch.Tensor]] = {r: [] for r in rows}
    bar = tqdm(total=len(chosen) * len(rows), desc="compose bench", unit="row")
    for case in chosen:
        pair = composers.AdapterSet(list(case.adapters), [1.0] * len(case.adapters)).resolve(lib)

        def config_of(c: str, case: Case = case) -> Any:
            config = composer_config(c, case, layout)
            return configure(c, config) if configure is not None else config

        runs = {c: lambda c=c: composers.apply(pipe, pair, c, config_of(c)) for c in composers_}
        # One batch of every seed per row (image i has seed i, as alone); "none" first, with nothing loaded; then
        # the pair is loaded once and every other row activates only its own adapters.
        config = GenerateConfig(prompt=case.prompt, model=model, seed=0, steps=steps, num_images=seeds)
        for row in [*(r for r in rows if r == "none"), *(r for r in rows if r != "none")]:
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
                    install[row].append(start - installed)
                    images = generate(config, pipe=pipe, output_type="pt").images  # (seeds, 3, H, W) in [0, 1]
                    seconds[row].append((time.perf_counter() - start) / seeds)
                finally:
                    if handle is not None:
                        handle.remove()
                for image in images if row not in timed_only else []:  # timed only: no judgement
                    for key, value in score_image(image, case).items():
                        figures[row][case.category][key].append(value)
                if names is None or names[0] == case.adapters[0]:
                    grid[row].append(images[0])  # one tile per case and row ("alone": the pair's first adapter)
            bar.update()
        unload_adapters(pipe)
    bar.close()
    single = statistics.median(seconds["alone"])
    judged = {row: per for row, per in figures.items() if row not in timed_only}
    means = {row: {cat: {key: round(statistics.mean(v), 4) for key, v in f.items()} for cat, f in per.items()}
             for row, per in judged.items()}
    table = {
        row: means.get(row, {})
        | {"time_ratio": round(statistics.median(seconds[row]) / single, 3),
           "install_seconds": round(max(install[row]), 3)}
        for row in figures
    }
    report = {"model": model, "steps": steps, "seeds": seeds, "layout": layout,
              "cases": {cat: len(group) for cat, group in by_category.items()},
              "threads": torch.get_num_threads(), "single_adapter_s_per_image": round(single, 4), "rows": table,
              "scoring_seconds": round(time.perf_counter() - began, 1),
              "raw": {row: {cat: {k: [round(x, 4) for x in v] for k, v in f.items()} for cat, f in per.items()}
                      for row, per in judged.items()},
              "raw_seconds": {row: [round(x, 6) for x in v] for row, v in seconds.items()}}
    _write(out, report, grid, rows)
    return report


_LAYOUTS = {"world": "scene's places", "prompt": "prompt's position words"}


def _write(out: Path, report: dict, grid: dict[str, list[torch.Tensor]], rows: list[str]) -> None:

    from studio.atomic import write_json, write_text

    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "compose-bench.json", report)
    cats = list(report["cases"])
    columns = {"two_subjects": ("composition_success", "two subjects: composition success"),
               "subject_object": ("both_right", "subject + object: both right"),
               "subject_style": ("composition_success", "subject + style: composition success")}
    head = ("| row | " + " | ".join(columns[c][1] for c in cats)
            + " | subject fidelity | prompt fidelity | time / single adapter |\n" + "|---" * (len(cats) + 4) + "|\n")
    body = ""
    for r, v in report["rows"].items():
        if not all(c in v for c in cats):  # timed only: the time ratio's reference, judged elsewhere
            body += f"| {r} | " + " | ".join(["timed only"] * (len(cats) + 2)) + f" | {v['time_ratio']:.2f}x |\n"
            continue
        mean = {k: statistics.mean(v[c][k] for c in cats) for k in ("subject_fidelity", "prompt_fidelity")}
        body += (f"| {r} | " + " | ".join(f"{v[c][columns[c][0]]:.3f}" for c in cats)
                 + f" | {mean['subject_fidelity']:.3f} | {mean['prompt_fidelity']:.3f} | {v['time_ratio']:.2f}x |\n")
    counts = ", ".join(f"{n} {c.replace('_', ' ')}" for c, n in report["cases"].items())
    note = (f"\nCases: {counts}; {report['seeds']} seeds each, {report['steps']} steps, {report['threads']} "
            f"threads; boxes from the {_LAYOUTS[report.get('layout', 'world')]}; 'alone' averages each adapter of "
            f"the case on its own; single adapter "
            f"{report['single_adapter_s_per_image']} s/image; scoring took {report['scoring_seconds']:.0f} s; "
            f"longest set-up outside the timing (e.g. CMLoRA's profiling, once per adapter): "
            + ", ".join(f"{r} {v['install_seconds']:.1f} s" for r, v in report["rows"].items()) + ".\n")
    write_text(out / "compose-bench.md", head + body + note)
    save_grid(out / "compose-bench-grid.png", [grid[r] for r in rows], labels=rows)


def run(args: argparse.Namespace) -> int:
    import composers

    library = Path(args.library)
    categories = tuple(args.category or CATEGORIES)
    if args.prepare:
        prepare(args.model, library, args.train_steps, needed(categories, args.pairs),
                {"world_objects": args.world_objects})
    if args.autolora_gate_steps:  # AutoLoRA's gates, trained on other concepts' adapters and shipped for the base
        from composers.autolora_train import train_gate
        from studio.generate import cached_pipeline
        from studio.library import Library

        gate_set = gate_adapter_names()
        prepare(args.model, library, args.train_steps, None, {"world_objects": args.world_objects}, gate_set)
        train_gate(cached_pipeline(args.model, "cpu"), list(gate_set), steps=args.autolora_gate_steps,
                   library=Library(library))
    report = run_bench(args.model, library, args.composer or list(composers.COMPOSERS), args.seeds, args.steps,
                       Path(args.out), pairs=args.pairs, categories=categories, layout=args.layout)
    print(json.dumps(report, indent=2))
    return 0


def register_bench(benches: argparse._SubParsersAction) -> None:
    parser = benches.add_parser("compose", help="composers side by side on Shapes World pairs (table and grid)")
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--prepare", action="store_true", help="train the fixed adapter set first (cached)")
    parser.add_argument("--train-steps", type=int, default=None, help="steps per adapter (default the method's)")
    parser.add_argument("--library", default="bench-out/compose/library", help="the bench's own adapter library")
    parser.add_argument("--world-objects", type=int, default=WORLD_OBJECTS, metavar="N",
                        help="--prepare: emblem renders hold the emblem and up to N-1 other objects "
                             f"(default {WORLD_OBJECTS})")
    parser.add_argument("--composer", action="append", help="a composer to score (repeatable; default all)")
    parser.add_argument("--seeds", type=int, default=8, help="seeds per pair")
    parser.add_argument("--pairs", type=int, default=None, help="cases per category (default all: 6, 4 and 8)")
    parser.add_argument("--category", action="append", choices=CATEGORIES, help="a category to score (repeatable; "
                        "default all); --prepare then trains only what its cases use")
    parser.add_argument("--autolora-gate-steps", type=int, default=0,
                        help="train AutoLoRA's gates first, this many steps, on 2 emblem and 2 texture adapters of "
                             "concepts no case uses (trained and cached like --prepare's), and ship them for the "
                             "base (0: the base's shipped gates, if any)")
    parser.add_argument("--steps", type=int, default=20, help="sampling steps")
    parser.add_argument("--layout", choices=("world", "prompt"), default="world",
                        help="the boxed composers' boxes: each emblem's place in the scene (default), or from the "
                             "prompt's position words as `studio compose` takes them without --box")
    parser.add_argument("--out", default="bench-out/compose")
    parser.set_defaults(func=run)
