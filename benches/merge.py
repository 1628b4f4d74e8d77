"""`studio bench merge`: do two separately trained emblems survive a merge by plain sum?

Per method (default: orthogonal adaptation, then DreamBooth-LoRA, side by side in one run), two emblems of the
evaluation split are trained at the method's defaults, each alone, and summed (`studio library merge A,B`, weights 1,
the `cat` combination: exactly dW_A + dW_B). Judged on the adapter bench's 20 prompts per emblem (every position on
every background): how often each emblem is found with its own adapter alone and with the sum loaded. And on
prompts naming both, each in its own place (left/right, top/bottom, on each background), with the sum: how often the
evaluator finds both emblems, sampled plainly and with regional sampling (the paper's multi-concept setting, section
4.2, after Mix-of-Show: `--composer multidiffusion`, each emblem's clause of the prompt denoising its own place, the
sum loaded everywhere).

`--draws N` judges each emblem prompt at N seeds, alone and in the sum on the same seeds, and the table gives each
drop's paired standard error: at one draw, 5 points is one image of 20, so the keep bar needs several. Each emblem's
crosstalk rho (`benches.crosstalk`, on its first 8 prompts) checks the paper's premise behind the sum: how hard the
other adapter's residual answers this emblem's layer inputs, against its own.

Bars (issue: orthogonal adaptation): each emblem's found rate with the orthogonal sum within `KEEP_BAR` of alone;
the DreamBooth-LoRA sum `DROP_BAR` or more below alone (the failure orthogonality removes); both emblems found in
`BOTH_BAR` of the two-emblem prompts with the orthogonal sum and regional sampling. Writes `merge-bench.md`, `.json`
and a grid.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from dataclasses import replace
from pathlib import Path

import torch

from benches.adapters import BATCH, TRIGGERS, Prompt, emblem_prompts, eval_emblems, judge_emblem, train_adapter
from benches.crosstalk import crosstalk, lora_layers
from benches.figures import save_grid
from studio.models import DEFAULT_MODEL


KEEP_BAR = 0.05  # orthogonal: merged found rate at most this far below alone
DROP_BAR = 0.20  # DreamBooth-LoRA: merged found rate at least this far below alone (else say so)
BOTH_BAR = 0.50  # orthogonal sum: both emblems found in a prompt naming both
DRAW_SEED_STEP = 1000  # draw k of a prompt uses its seed + k * this
CROSSTALK_PROMPTS = 8  # each emblem's first prompts, sampled for `benches.crosstalk`
PAIRS = (("left", "right"), ("right", "left"), ("top", "bottom"), ("bottom", "top"))


def both_prompts(seeds: list[int], triggers: tuple[str, str]) -> list[Prompt]:
    """Two emblems, large, in opposite places, on each background: 16 prompts."""
    from studio.world.grammar import BACKGROUNDS, EMBLEM, Scene, SceneObject

    out = []
    for i, ((p, q), bg) in enumerate((pq, b) for pq in PAIRS for b in BACKGROUNDS):
        objects = (SceneObject(EMBLEM, None, "large", p, emblem=seeds[0]),
                   SceneObject(EMBLEM, None, "large", q, emblem=seeds[1]))
        scene = Scene(objects, bg)
        first, second = scene.caption().split(" and ", 1)  # each emblem named by its own trigger
        text = " and ".join(part.replace("emblem", f"{t} emblem") for part, t in zip((first, second), triggers))
        out.append(Prompt(text, scene, i))
    return out


def judge_both(images: list[torch.Tensor], prompts: list[Prompt]) -> float:
    """Fraction of images where the evaluator finds each asked emblem (any position)."""
    from studio.world.evaluator import evaluate

    hits = []
    for image, p in zip(images, prompts):
        objects = evaluate(image, p.scene)["objects"]
        hits.append(all(bool(o.get("emblem")) for o in objects))
    return round(statistics.mean(hits), 4)


def run_bench(model: str, methods: list[str], out: Path, *, steps: int = 20, overrides: dict | None = None,
              per_emblem: int = 20, n_both: int = 16, draws: int = 1) -> dict:
    """Train, merge, generate and judge; write the table, JSON and grid; return the report (fewer prompts than the
    bar's 20 per emblem and 16 pairs only for a quick look). `draws` seeds per emblem prompt: each emblem is judged on
    `per_emblem * draws` images, alone and in the sum on the same seeds, and its drop carries the paired standard
    error."""
    from studio.errors import StudioError
    from studio.generate import GenerateConfig, cached_pipeline, generate
    from studio.library import Library, load_adapters, merge, unload_adapters

    if draws < 1:
        raise StudioError(f"--draws must be at least 1 (seeds per emblem prompt), got {draws}")
    library, pipe = out / "library", cached_pipeline(model, "cpu")
    lib = Library(library)

    def generate_fn(prompts: list[Prompt]) -> list[torch.Tensor]:
        images = []
        for at in range(0, len(prompts), BATCH):
            chunk = prompts[at:at + BATCH]
            config = GenerateConfig(prompt=chunk[0].text, model=model, steps=steps, num_images=len(chunk))
            images += list(generate(config, pipe=pipe, output_type="pt", prompts=[p.text for p in chunk],
                                    seeds=[p.seed for p in chunk]).images)
        return images

    def judged(names: list[str], prompts: list[Prompt], judge) -> tuple[object, list[torch.Tensor]]:  # noqa: ANN001
        load_adapters(pipe, names, [1.0] * len(names), library=lib)
        try:
            images = generate_fn(prompts)
        finally:
            unload_adapters(pipe, names)
        return judge(images), images

    def measure_crosstalk(names: list[str], triggers: tuple[str, ...], seeds: list[int]) -> dict | None:
        """rho of each emblem (`benches.crosstalk`) over its first CROSSTALK_PROMPTS prompts; None for adapters that
        are not LoRA (LoKr, sparse deltas), whose residuals it does not read."""
        def run(i: int) -> None:
            load_adapters(pipe, names, [float(j == i) for j in range(len(names))], library=lib)
            generate_fn(emblem_prompts(seeds[i], triggers[i])[:CROSSTALK_PROMPTS])

        load_adapters(pipe, names, [1.0] * len(names), library=lib)
        try:
            return crosstalk(pipe.unet, names, run) if lora_layers(pipe.unet, names) else None
        finally:
            unload_adapters(pipe, names)

    seeds, triggers = eval_emblems(2), TRIGGERS[:2]
    rows, grid = [], {}
    for method in methods:
        names = [f"merge-{method.replace('_', '-')}-{i}" for i in range(2)]
        trained = [train_adapter(method, n, t, {"world_emblem": s}, model, library, overrides or {})
                   for n, t, s in zip(names, triggers, seeds)]
        summed = f"merge-{method.replace('_', '-')}-sum"
        merge([(n, 1.0) for n in names], summed, library=lib, overwrite=True)
        row: dict = {"method": method, "seconds": [t["seconds"] for t in trained], "emblems": [],
                     "crosstalk": measure_crosstalk(names, triggers, seeds)}
        for name, trigger, seed in zip(names, triggers, seeds):
            prompts = [replace(p, seed=p.seed + DRAW_SEED_STEP * k) for k in range(draws)
                       for p in emblem_prompts(seed, trigger)[:per_emblem]]
            alone, images = judged([name], prompts, lambda im, p=prompts, s=seed: judge_emblem(im, p, s))
            merged, merged_images = judged([summed], prompts, lambda im, p=prompts, s=seed: judge_emblem(im, p, s))
            row["emblems"].append({"seed": seed, "alone": alone["emblem"], "merged": merged["emblem"],
                                   "crosstalk": row["crosstalk"][name]["all"] if row["crosstalk"] else None,
                                   "drop": round(alone["emblem"] - merged["emblem"], 4), "images": len(prompts),
                                   "drop_se": paired_se(alone["raw"]["emblem"], merged["raw"]["emblem"])})
            grid[f"{name} alone"], grid[f"{name} in sum"] = images[:8], merged_images[:8]  # (3, H, W) each
        pair = both_prompts(seeds, triggers)[:n_both]
        row["both"], grid[f"{summed} both"] = judged([summed], pair, lambda im, p=pair: judge_both(im, p))
        regional = regional_images(pipe, summed, pair, model, steps, library)
        row["both_regional"], grid[f"{summed} both, regional"] = judge_both(regional, pair), regional
        rows.append(row)
    report = {"model": model, "steps": steps, "threads": torch.get_num_threads(), "rows": rows,
              "world_objects": (overrides or {}).get("world_objects", 1),
              "bars": {"keep": KEEP_BAR, "drop": DROP_BAR, "both": BOTH_BAR}, "verdicts": verdicts(rows)}
    _write(out, report, grid)
    return report


def paired_se(before: list[int], after: list[int]) -> float:
    """Standard error of the mean of `before - after` over the same images (0/1 hits): the drop's own noise."""
    diffs = [a - b for a, b in zip(before, after, strict=True)]
    return round(statistics.stdev(diffs) / len(diffs) ** 0.5, 4) if len(diffs) > 1 else 0.0


def regional_images(pipe: object, name: str, prompts: list[Prompt], model: str, steps: int, library: Path
                    ) -> list[torch.Tensor]:
    """The prompts with adapter `name` of `library` under `--composer multidiffusion`: a sum holding both triggers
    gets one region per placed clause (composers.multidiffusion), so each emblem's clause denoises its own place."""
    import composers
    from studio.generate import GenerateConfig

    before = os.environ.get("STUDIO_LIBRARY")
    os.environ["STUDIO_LIBRARY"] = str(library)  # composers resolve adapters and triggers in the library
    try:
        adapters = composers.AdapterSet([name], [1.0])
        images = []
        for p in prompts:  # each prompt its own layout
            config = GenerateConfig(prompt=p.text, model=model, steps=steps, num_images=1, seed=p.seed)
            images.append(composers.compose(config, adapters, "multidiffusion", pipe=pipe,
                                            output_type="pt").images[0])  # (3, H, W)
    finally:
        if before is None:
            os.environ.pop("STUDIO_LIBRARY", None)
        else:
            os.environ["STUDIO_LIBRARY"] = before
    return images


def verdicts(rows: list[dict]) -> dict[str, bool]:
    out = {}
    for row in rows:
        drops = [e["drop"] for e in row["emblems"]]
        if row["method"] == "orthogonal":
            out["orthogonal keeps each emblem"] = all(d <= KEEP_BAR for d in drops)
            out["orthogonal shows both (regional sampling)"] = row.get("both_regional", 0.0) >= BOTH_BAR
        else:
            out[f"{row['method']} sum loses an emblem"] = any(d >= DROP_BAR for d in drops)
    return out


def _write(out: Path, report: dict, grid: dict[str, list[torch.Tensor]]) -> None:

    from studio.atomic import write_json, write_text

    write_json(out / "merge-bench.json", report)
    lines = ["| method | emblem | images | found alone | found in the sum | drop (paired s.e.) | crosstalk rho | "
             "both found (sum) | both, regional |", "|---|---|---|---|---|---|---|---|---|"]
    for r in report["rows"]:
        for i, e in enumerate(r["emblems"]):
            both = f"{r['both']:.2f} | {r.get('both_regional', 0.0):.2f}" if i == 0 else " |"
            lines.append(f"| {r['method']} | {e['seed']} | {e.get('images', '-')} | {e['alone']:.2f} | "
                         f"{e['merged']:.2f} | {e['drop']:+.2f} ({e.get('drop_se', 0.0):.2f}) | "
                         f"{_cell(e.get('crosstalk'))} | {both} |")
    objects = report.get("world_objects", 1)
    renders = "one emblem per training render" if objects == 1 else f"training renders of up to {objects} objects"
    lines += ["", f"{report['threads']} threads, {report['steps']} sampling steps, {renders}. Crosstalk rho: the "
              "other adapter's residual on this emblem's layer inputs over its own (`benches.crosstalk`; the paper's "
              "premise is rho << 1).", "",
              *(f"- {k}: {'yes' if v else 'no'}" for k, v in report["verdicts"].items())]
    write_text(out / "merge-bench.md", "\n".join(lines) + "\n")
    save_grid(out / "merge-bench-grid.png", list(grid.values()))
    _plot_crosstalk(out / "merge-bench-crosstalk.png", report["rows"])


def _cell(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _plot_crosstalk(path: Path, rows: list[dict]) -> None:
    """rho per kind of layer, a bar per method and emblem (`benches.crosstalk`); none when no row has it."""
    from benches.report_plots import bars

    series = {f"{r['method']} {name.rsplit('-', 1)[-1]}": rho for r in rows
              for name, rho in (r.get("crosstalk") or {}).items()}
    if not series:
        return
    kinds = list(dict.fromkeys(k for rho in series.values() for k in rho))  # "all" first, then each kind of layer
    bars(path, [k.replace("attn", "a").replace(".to_", ".") for k in kinds],
         {label: [rho.get(k) for k in kinds] for label, rho in series.items()},
         title="Crosstalk of the summed adapters, per kind of layer", y_label="rho",
         caption="rho: the other adapter's residual on an emblem's layer inputs over its own (1: as strong); "
                 "orthogonal adaptation's premise is rho << 1")


def run(args: argparse.Namespace) -> int:
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    overrides = {"train_steps": args.train_steps} if args.train_steps is not None else {}  # 0: refused, not ignored
    if args.world_objects > 1:
        overrides["world_objects"] = args.world_objects
    report = run_bench(args.model, args.method or ["orthogonal", "dreambooth_lora"], Path(args.out),
                       steps=args.steps, overrides=overrides, draws=args.draws)
    print((Path(args.out) / "merge-bench.md").read_text())
    print(f"bench took {time.perf_counter() - start:.0f} s")
    return 0 if all(report["verdicts"].values()) else 1


def register_bench(benches: argparse._SubParsersAction) -> None:
    parser = benches.add_parser("merge", help="two emblems trained apart, merged by plain sum: kept or lost")
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--method", action="append", help="a method (repeatable; default orthogonal, dreambooth_lora)")
    parser.add_argument("--train-steps", type=int, default=None, help="override the default steps (not the bar)")
    parser.add_argument("--world-objects", type=int, default=1, metavar="N",
                        help="train each emblem on renders that also hold up to N-1 other objects (studio train "
                             "--world-objects), which prompts naming both emblems need")
    parser.add_argument("--steps", type=int, default=20, help="sampling steps")
    parser.add_argument("--draws", type=int, default=1, metavar="N",
                        help="seeds per emblem prompt (20 prompts each): at 1, a drop of 5 points is one image; "
                             "the table prints each drop's paired standard error")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="bench-out/merge")
    parser.set_defaults(func=run)
