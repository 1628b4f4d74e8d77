"""`studio bench retrieve`: AutoLoRA retrieval (arXiv:2508.02107 section 3.1) on a library of Shapes World adapters.

`--prepare` trains (or finds, so an interrupted preparation resumes) the bench's library: emblems and textures by
three methods (DreamBooth-LoRA, DiffuseKronA, orthogonal adaptation), some concepts twice by two methods. Training is
short (`--train-steps`, default 25, no prior preservation, no previews): the retriever reads the weights, not images.
The retriever is trained on the library minus the held-out adapters (`plan`: new concepts and second adapters of a
concept by another method), then every adapter of the library is a candidate and every concept is asked for with the
`eval` phrasings of `studio.world.describe` (other wordings than the retriever's captions, never a trigger word). A
hit is an adapter of the named concept. Reports top-1 / top-3, weights only and with metadata, overall and on the
held-out adapters' concepts. Writes `retrieve-bench.md` and `retrieve-bench.json`. `--folds 6` cross-validates: six
retrievers, each never shown 3 other emblems, so every emblem is a new concept once, and the rates pool every fold.

Cross-validated (`studio bench retrieve --folds 6`, retriever seed 0, 2 CPU cores, 1,901 s; `docs/retrieve/`): from the
weights alone top-1 0.864, top-3 0.929 over 1,200 prompts: concepts the retriever learned 0.956 / 1.000 (1,056
prompts), the 18 new concepts 0.188 / 0.410 (144 prompts; per fold top-1 0.00-0.50, top-3 0.08-0.75); with metadata
0.997 / 1.000 (new concepts 0.972 / 1.000). The default fold, the last three emblems, is the easiest of the six for new
concepts; the figures below are that fold's. Nor does the weight encoder read a known look from an adapter it never
saw: with the learned adapter of each of the 3 twice-trained concepts removed from that fold's library, their unseen
second adapters (another method) are found from the weights at top-1 0.17, top-3 0.67 (24 prompts; 0.75 / 1.00 with
metadata). It recognises the adapters it was trained on.

Measured (`studio bench retrieve --prepare`, 25 steps per adapter, 2 CPU cores): 28 adapters of 25 concepts, 6 held
out (3 new emblems, 3 second adapters by another method), 200 prompts. The retriever's 1000 steps take 220-285 s.
From the weights alone, retriever seeds 0 / 1 / 2: top-1 0.885 / 0.840 / 0.860, top-3 0.970 / 0.950 / 0.965; the 22
trained concepts are found first in 169 / 168 / 170 of their 176 prompts, and the 3 new concepts read top-1 0.333 /
0 / 0.083, top-3 0.750 / 0.583 / 0.708. With metadata: 1.000 / 1.000, 1.000 / 1.000, 0.980 / 1.000. The same
library and seeds, step by step:
- the text head reading the words only in their context, ranked by cosine: 0.800 / 0.825 / 0.825 top-1, 0.925 /
  0.945 / 0.930 top-3 (trained concepts first in 156 / 163 / 157 of 176: it missed trained looks in the eval
  wordings); new concepts 0.167 / 0.083 / 0.333 and 0.625 / 0.667 / 0.583;
- reading the words alone too (`studio.library.encoder`), by cosine: 0.900 / 0.875 / 0.865 and 0.970 / 0.920 /
  0.910 (trained concepts 176 / 175 / 173), new concepts 0.167 / 0 / 0 and 0.750 / 0.333 / 0.250: the trained
  adapters, close to every caption of their look, crowd the new ones out;
- and with the hubness correction (`studio.library.retrieval`, CSLS): the figures above.
Earlier preparations read 0.775 / 0.895 at seed 0 with the first text head (with 300 retriever steps 0.675 / 0.850,
another machine 0.730 / 0.900).
What limits the new concepts is that 15 emblems teach the weight side little about looks it never saw: a new
emblem's nearest adapter in the space is the trained one that shares most of its look (`blue circle inside a purple
heart, white dot` sits next to `blue diamond inside a purple heart, white dot`), which then ranks first. The world
CLIP cannot stand in either: it matches the eval phrasings (100 prompts, one draw of scene words) to exact renders of
the 25 concepts (4 each, mean image-text similarity) at top-1 0.23 / top-3 0.39, so ranking each adapter's renders
did worse. More adapters in training did not fix it: with 150 more emblem adapters (DreamBooth-LoRA and DiffuseKronA
in turn, 25 steps each, glyphs disjoint from the bench's; 173 trained on, 1000 steps, the earlier text head), the new
concepts read 0.25 / 0.50 and the whole bench 0.695 / 0.860 from the weights alone (one run). Nor did these, at
retriever seeds 0 / 1 / 2 beside the figures above: the bench's adapters trained 150 steps instead of 25 (13 min to
prepare), top-1 0.850 / 0.915 / 0.895, top-3 0.960 / 0.965 / 0.960, the new concepts' top-3 0.67 / 0.71 / 0.67;
the three retrievers' scores averaged, 0.865 / 0.975; a second InfoNCE on caption fragments (runs of 2-4 words,
positive with every adapter whose captions hold them), at seeds 0 / 1 0.890 / 0.875 top-1 and 0.950 / 0.935 top-3,
the new concepts' top-3 0.58 / 0.46.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from studio.models import DEFAULT_MODEL


NUM_EMBLEMS = 18
FIRST_EMBLEM_SEED = 1000
TEXTURE_NAMES = ("stripes", "dots", "checker", "grid", "gradient", "waves", "concentric")
METHODS = ("dreambooth_lora", "kronecker", "orthogonal")
SHORT = {"dreambooth_lora": "lora", "kronecker": "lokr", "orthogonal": "orth"}
METHOD_OPTIONS: dict[str, dict[str, Any]] = {"dreambooth_lora": {"rank": 8}, "kronecker": {},
                                             "orthogonal": {"rank": 4}}
NEW_CONCEPTS_HELD_OUT = 3  # emblems per fold that the retriever never sees: new concepts
FOLDS = NUM_EMBLEMS // NEW_CONCEPTS_HELD_OUT  # cross-validation: each fold holds out 3 other emblems
SECOND_METHOD = (0, 1)  # emblem indices trained a second time by the next method (held out) ...
SECOND_TEXTURE = (0,)  # ... and texture indices


@dataclass(frozen=True)
class Planned:
    name: str
    method: str
    trigger: str
    source: dict[str, Any]  # world_emblem or world_texture
    held_out: bool

    @property
    def concept(self) -> str:
        return f"emblem-{self.source['world_emblem']}" if "world_emblem" in self.source else \
            f"texture-{self.source['world_texture']}"


def emblem_seeds(n: int = NUM_EMBLEMS) -> list[int]:
    """`n` seeds from FIRST_EMBLEM_SEED on whose glyphs all differ."""
    from studio.world.emblems import emblem

    seeds, seen, s = [], set(), FIRST_EMBLEM_SEED
    while len(seeds) < n:
        if emblem(s).glyph() not in seen:
            seen.add(emblem(s).glyph())
            seeds.append(s)
        s += 1
    return seeds


def _trigger(i: int) -> str:
    consonants, vowels = "bdfgklmnprstvz", "aeiou"
    return consonants[i % 14] + vowels[(i // 14) % 5] + consonants[(i * 5 + 3) % 14] + "x"


def plan(fold: int = FOLDS - 1) -> list[Planned]:
    """The bench library: every concept once (methods in turn), plus second adapters by the next method (always held
    out). Fold `f` holds out emblems 3f..3f+2 as new concepts; the default, the last fold, the last three emblems.
    Every fold plans the same adapters: only which are held out differs."""
    if not 0 <= fold < FOLDS:
        from studio.errors import StudioError

        raise StudioError(f"fold {fold}: the bench has folds 0 to {FOLDS - 1}")
    out: list[Planned] = []
    seeds = emblem_seeds()
    concepts = [{"world_emblem": s} for s in seeds] + [{"world_texture": t} for t in TEXTURE_NAMES]
    for i, source in enumerate(concepts):
        method = METHODS[i % len(METHODS)]
        held = "world_emblem" in source and fold * NEW_CONCEPTS_HELD_OUT <= i < (fold + 1) * NEW_CONCEPTS_HELD_OUT
        label = source.get("world_emblem", source.get("world_texture"))
        kind = "emblem" if "world_emblem" in source else "texture"
        out.append(Planned(f"rt-{kind}-{label}-{SHORT[method]}", method, _trigger(i), source, held))
    seconds = [concepts[i] for i in SECOND_METHOD] + [concepts[len(seeds) + i] for i in SECOND_TEXTURE]
    for j, source in enumerate(seconds):
        i = concepts.index(source)
        method = METHODS[(i + 1) % len(METHODS)]
        label = source.get("world_emblem", source.get("world_texture"))
        kind = "emblem" if "world_emblem" in source else "texture"
        out.append(Planned(f"rt-{kind}-{label}-{SHORT[method]}", method, _trigger(len(concepts) + j), source, True))
    return out


def prepare(model: str, library: Path, steps: int) -> list[str]:
    """Train the planned adapters missing from `library` (resumable: finished ones are kept); returns those trained."""
    from tqdm import tqdm

    from studio.library import Library
    from trainers import METHODS as TRAINERS
    from trainers import TrainConfig, train

    lib, made = Library(library), []
    todo = [p for p in plan() if p.name not in lib]
    for p in tqdm(todo, desc="bench library", unit="adapter"):
        method = TRAINERS[p.method].config_cls(**METHOD_OPTIONS[p.method])
        config = TrainConfig(trigger=p.trigger, name=p.name, model=model, seed=0, train_steps=steps,
                             run_dir=str(library / ".runs" / p.name), overwrite=True, progress=False, save_every=0,
                             prior_preservation=False, sample_prompts=[], **p.source)
        train(method, config, library=lib)
        made.append(p.name)
    return made


def queries(planned: list[Planned], seeds: int) -> list[tuple[str, str]]:
    """(prompt, concept) pairs: every concept of the library in the `eval` phrasings, `seeds` draws of scene words."""
    from studio.world.describe import phrasings

    concepts = {p.concept: p.source for p in planned}
    return [(text, concept) for concept, source in concepts.items() for seed in range(seeds)
            for text in phrasings(**source, split="eval", seed=seed)]


def score(library: Path, planned: list[Planned], seeds: int) -> dict[str, Any]:
    """Top-1 and top-3 hit rates, weights only and with metadata, overall and on the held-out adapters' concepts."""
    from tqdm import tqdm

    from studio.library import Library
    from studio.library.retrieval import retrieve

    lib = Library(library)
    by_name = {p.name: p.concept for p in planned}
    held = {p.concept for p in planned if p.held_out}
    new = {p.concept for p in planned if p.held_out} - {p.concept for p in planned if not p.held_out}
    out: dict[str, Any] = {}
    for mode, weights_only in (("weights_only", True), ("with_metadata", False)):
        hits: dict[str, list[tuple[bool, bool]]] = {"all": [], "held_out_concepts": [], "new_concepts": []}
        misses = []
        for text, concept in tqdm(queries(planned, seeds), desc=f"retrieve bench: {mode.replace('_', ' ')}",
                                  unit="prompt"):
            ranked = [by_name.get(r.name) for r in retrieve(text, 3, weights_only=weights_only, library=lib)]
            hit = (ranked[0] == concept, concept in ranked)
            hits["all"].append(hit)
            if concept in held:
                hits["held_out_concepts"].append(hit)
            if concept in new:
                hits["new_concepts"].append(hit)
            if not hit[0]:
                misses.append({"prompt": text, "wanted": concept, "got": ranked})
        out[mode] = {group: {"top1": round(sum(h[0] for h in v) / max(1, len(v)), 4),
                             "top3": round(sum(h[1] for h in v) / max(1, len(v)), 4), "prompts": len(v)}
                     for group, v in hits.items()}
        out[mode]["misses"] = misses[:20]
    return out


def run_bench(library: Path, steps: int, seeds: int, out: Path, seed: int = 0, folds: int = 1) -> dict[str, Any]:
    """Train the retriever without the held-out adapters, then score every concept's eval prompts. With `folds` > 1,
    the last `folds` folds in turn (a retriever each; the last fold's stays with the library), and the hit rates
    are pooled over them: every prompt once per fold, every emblem a new concept in one fold when `folds` is 6."""
    import torch

    from studio.errors import StudioError
    from studio.library import Library
    from studio.library.retrieval import RetrieverConfig, train_retriever

    if not 1 <= folds <= FOLDS:
        raise StudioError(f"--folds {folds}: give 1 to {FOLDS}")
    lib = Library(library)
    missing = [p.name for p in plan() if p.name not in lib]
    if missing:
        raise StudioError(f"the bench library lacks {missing[0]} (and {len(missing) - 1} more); run with --prepare")
    began = time.perf_counter()
    runs = []
    for fold in range(FOLDS - folds, FOLDS):
        planned = plan(fold)
        held = [p.name for p in planned if p.held_out]
        info = train_retriever(lib, RetrieverConfig(steps=steps, seed=seed), exclude=held)
        new = sorted({p.concept for p in planned if p.held_out} - {p.concept for p in planned if not p.held_out})
        runs.append({"fold": fold, "held_out": held, "new_concepts": new, "retriever": info,
                     **score(library, planned, seeds)})
    last = runs[-1]
    everything = plan()
    report = {"library": str(library), "adapters": len(everything), "concepts": len({p.concept for p in everything}),
              "methods": {m: sum(p.method == m for p in everything) for m in METHODS},
              "held_out": last["held_out"], "trained_on": len(last["retriever"]["trained_on"]),
              "retriever": last["retriever"], "seed": seed, "threads": torch.get_num_threads(),
              **(_pooled(runs) if folds > 1 else {m: last[m] for m in ("weights_only", "with_metadata")}),
              "seconds": round(time.perf_counter() - began, 1)}
    if folds > 1:
        report["folds"] = [{k: v for k, v in r.items() if k != "retriever"} for r in runs]
    _write(out, report)
    return report


def _pooled(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Hit rates over every fold's prompts (each fold's groups weighted by their prompts)."""
    out: dict[str, Any] = {}
    for mode in ("weights_only", "with_metadata"):
        out[mode] = {}
        for group in ("all", "held_out_concepts", "new_concepts"):
            n = sum(r[mode][group]["prompts"] for r in runs)
            out[mode][group] = {k: round(sum(r[mode][group][k] * r[mode][group]["prompts"] for r in runs)
                                         / max(1, n), 4) for k in ("top1", "top3")} | {"prompts": n}
        out[mode]["misses"] = [m for r in runs for m in r[mode]["misses"]][:20]
    return out


def _write(out: Path, report: dict[str, Any]) -> None:
    from studio.atomic import write_json, write_text

    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "retrieve-bench.json", report)
    rows = "".join(
        f"| {mode.replace('_', ' ')} | {group.replace('_', ' ')} | {v['top1']:.3f} | {v['top3']:.3f} | "
        f"{v['prompts']} |\n"
        for mode in ("weights_only", "with_metadata") for group, v in report[mode].items() if group != "misses")
    text = (
        "| signal | prompts about | top-1 | top-3 | prompts |\n|---|---|---|---|---|\n" + rows +
        f"\n{report['adapters']} adapters ({', '.join(f'{n} {m}' for m, n in report['methods'].items())}) of "
        f"{report['concepts']} concepts; the retriever trained on {report['trained_on']} for "
        f"{report['retriever']['config']['steps']} steps ({report['retriever']['seconds']} s); held out: "
        f"{', '.join(report['held_out'])}. 'held out concepts': prompts about the held-out adapters' concepts (a hit "
        "may be any adapter of the concept); 'new concepts': concepts with no adapter in training.\n")
    if report.get("folds"):
        text += (f"\nCross-validated over {len(report['folds'])} folds, a retriever each (the figures above pool "
                 "every fold's prompts; the held-out list is the last fold's). Weights only, per fold:\n\n"
                 "| fold | new concepts | all: top-1 | all: top-3 | new: top-1 | new: top-3 |\n"
                 "|---|---|---|---|---|---|\n" + "".join(
                     f"| {f['fold']} | {', '.join(f['new_concepts'])} | {f['weights_only']['all']['top1']:.3f} | "
                     f"{f['weights_only']['all']['top3']:.3f} | {f['weights_only']['new_concepts']['top1']:.3f} | "
                     f"{f['weights_only']['new_concepts']['top3']:.3f} |\n" for f in report["folds"]))
    write_text(out / "retrieve-bench.md", text)


def run(args: argparse.Namespace) -> int:
    library = Path(args.library)
    if args.prepare:
        prepare(args.model, library, args.train_steps)
    report = run_bench(library, args.retriever_steps, args.seeds, Path(args.out), seed=args.seed, folds=args.folds)
    print(json.dumps({k: v for k, v in report.items() if k != "retriever"}, indent=2))
    return 0


def register_bench(benches: argparse._SubParsersAction) -> None:
    parser = benches.add_parser("retrieve", help="AutoLoRA retrieval on a library of Shapes World adapters")
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--prepare", action="store_true", help="train the bench's adapters first (resumable)")
    parser.add_argument("--train-steps", type=int, default=25, help="training steps per adapter")
    parser.add_argument("--library", default="bench-out/retrieve/library", help="the bench's own adapter library")
    parser.add_argument("--retriever-steps", type=int, default=1000, help="retriever training steps")
    parser.add_argument("--seeds", type=int, default=2, help="draws of scene words per eval phrasing")
    parser.add_argument("--seed", type=int, default=0, help="seed of the retriever's training")
    parser.add_argument("--folds", type=int, default=1, help=f"cross-validate: the last N of the {FOLDS} folds, a "
                        f"retriever each (1: the last {NEW_CONCEPTS_HELD_OUT} emblems new; {FOLDS}: every emblem "
                        "new once)")
    parser.add_argument("--out", default="bench-out/retrieve")
    parser.set_defaults(func=run)
