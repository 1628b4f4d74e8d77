"""`studio bench adapters`: do adapters trained at their defaults meet the trainer bar on Shapes World?

Per method (default: every trainer method, `trainers.METHODS`: DreamBooth-LoRA, DiffuseKronA, orthogonal
adaptation, SaRA), each adapter trained by `trainers.train` with nothing but its source, trigger and name, as
`studio train` at its defaults would (wall clock from the call to the adapter in the library, class images included
when the defaults make them):

- three emblems (subjects) drawn from the evaluation split: on 20 prompts placing the trigger at every position on
  every background, how often the evaluator finds the emblem, the asked position and the asked background; and the
  base's single-object accuracy on `studio bench base`'s prompts (same prompts and seeds) with the adapter loaded
  and its trigger absent, against the base alone: the adapter must not leak into prompts that do not ask for it.
- one texture (a style): on 20 new scenes `... in {trigger} style`, how often the texture is found, and how often
  each asked object's shape, colour and position follow the prompt.
- trainable parameters, and each method's as a fraction of the default DreamBooth-LoRA's (the bar's reference;
  counted on the base without training when that method is not benched).
- `--method b_lora`: its own rows (one image split into a content and a style entry; `benches.b_lora`); `--sweep`
  measures the candidate block pairs of the embedded base.

Writes `adapters-bench.md` (table and verdicts), `adapters-bench.json` and `adapters-bench-grid.png` (a row per
adapter). The bars are fixed constants; a method passes when every adapter of it reaches all of them.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from benches.figures import save_grid
from benches.judging import BATCH, PLACES, GenerateFn, Prompt, judge_texture, texture_prompts, training_peak
from studio.models import DEFAULT_MODEL


FOUND_BAR = 0.80  # emblem found / texture found
PLACE_BAR = 0.80  # asked position and background (emblems); shape, colour and position (textures)
DRIFT_BAR = 0.05  # largest drop of the base's single-object accuracy with the adapter loaded, trigger absent
SECONDS_BAR = 300.0  # training wall clock per adapter on the machine that runs the bench (2 CPU cores in the bar)
EMBLEM_STREAM = 0xE3B5  # emblem seeds of the bench: the "eval" split of their own stream
REFERENCE = "dreambooth_lora"  # parameter ratios are against this method at its defaults
TRIGGERS = ("sks", "zwx", "qrv")
TEXTURE_TRIGGER = "vgl"
ACCURACY_KEYS = ("shape", "colour", "position", "background")  # `studio bench base`'s single-object bar
EMBLEM_PROMPTS = 20  # `emblem_prompts`: 5 places x 4 backgrounds



def eval_emblems(n: int = 3) -> list[int]:
    """`n` emblem seeds from the evaluation split (never a training seed of the bench's other adapters)."""
    from studio.world.datasets import _rng

    rng = _rng(EMBLEM_STREAM, "eval", 0)
    return [int(s) for s in rng.integers(10_000, 1 << 30, size=n)]


def emblem_prompts(seed: int, trigger: str) -> list[Prompt]:
    """The emblem, large, at each of the 5 named positions on each of the 4 backgrounds: 20 prompts."""
    from studio.world.grammar import BACKGROUNDS, EMBLEM, Scene, SceneObject

    out = []
    for i, (pos, bg) in enumerate((p, b) for p in PLACES for b in BACKGROUNDS):
        scene = Scene((SceneObject(EMBLEM, None, "large", pos, emblem=seed),), bg)
        out.append(Prompt(scene.caption().replace("emblem", f"{trigger} emblem"), scene, i))
    return out


def train_adapter(method: str, name: str, trigger: str, source: dict, model: str, library: Path,
                  overrides: dict) -> dict:
    """Train one adapter into `library` at the method's defaults; its wall clock and trainable parameters."""
    from studio.library import Library
    from trainers import TrainConfig, train

    config = TrainConfig(trigger=trigger, name=name, model=model, overwrite=True, progress=False,
                         run_dir=str(library / ".runs" / name), **source, **overrides)
    with training_peak(config.device) as peak:
        start = time.perf_counter()
        result = train(method, config, library=Library(library))
        seconds = time.perf_counter() - start
    params = sum(t.numel() for t in result.method.trainable_tensors().values())
    return {"name": name, "seconds": round(seconds, 1), "trainable_params": params, **peak}


def judge_emblem(images: list[torch.Tensor], prompts: list[Prompt], seed: int) -> dict[str, float]:
    from studio.world.evaluator import evaluate

    hits: dict[str, list[bool]] = {"emblem": [], "position": [], "background": []}
    for image, p in zip(images, prompts):
        r = evaluate(image, p.scene, emblem=seed)
        o = r["objects"][0]
        hits["emblem"].append(bool(o.get("emblem")))
        hits["position"].append(bool(o["position"]))
        hits["background"].append(bool(r["background"]["correct"]))
    return {**{k: round(statistics.mean(v), 4) for k, v in hits.items()},
            "raw": {k: [int(h) for h in v] for k, v in hits.items()}}  # per image, for `studio bench report --compare`


def reference_params(model: str) -> int:
    """Trainable parameters of the default DreamBooth-LoRA attached to a fresh copy of `model` (nothing trained)."""
    from studio.models.loading import load_pipeline
    from trainers import METHODS

    method = METHODS[REFERENCE]()
    method.attach(load_pipeline(model))
    return sum(t.numel() for t in method.trainable_tensors().values())


def single_accuracy(generate_fn: GenerateFn, n: int) -> dict[str, float]:
    """`studio bench base`'s first `n` single-object prompts: each attribute's fraction and their mean."""
    from benches.base import bar_prompts, score

    entries = bar_prompts(n)["single"]
    images = generate_fn([prompt for prompt, _, _ in entries], [seed for _, _, seed in entries])
    figures = score(images, [scene for _, scene, _ in entries])
    out = {k: figures[k] for k in ACCURACY_KEYS}
    out["mean"] = round(statistics.mean(out.values()), 4)
    out["raw"] = {k: figures["raw"][k] for k in ACCURACY_KEYS}  # per judgement, for `studio bench report --compare`
    return out


def method_rows(method: str, model: str, library: Path, generate_fn: GenerateFn, pipe: object, overrides: dict,
                base_accuracy: dict, n_base: int, n_texture: int, texture: str, emblems: list[int],
                grid: dict[str, list[torch.Tensor]], n_emblem: int = EMBLEM_PROMPTS) -> list[dict]:
    """Train and judge the bench's adapters of one method."""
    from tqdm import tqdm

    from studio.library import Library, load_adapters, unload_adapters

    jobs = [("emblem", s, t) for s, t in zip(emblems, TRIGGERS)]
    jobs += [("texture", texture, TEXTURE_TRIGGER)] if texture else []
    rows = []
    for kind, what, trigger in tqdm(jobs, desc=f"adapters bench: {method}", unit="adapter"):
        name = f"bar-{method.replace('_', '-')}-{kind}-{what}"
        source = {"world_emblem": what} if kind == "emblem" else {"world_texture": what}
        row = {"method": method, "kind": kind, "concept": str(what),
               **train_adapter(method, name, trigger, source, model, library, overrides)}
        prompts = emblem_prompts(what, trigger)[:n_emblem] if kind == "emblem" else \
            texture_prompts(what, trigger, n_texture)
        load_adapters(pipe, [name], [1.0], library=Library(library))
        try:
            images = generate_fn([p.text for p in prompts], [p.seed for p in prompts])
            if kind == "emblem":
                row.update(judge_emblem(images, prompts, what))
                row["single_accuracy"] = single_accuracy(generate_fn, n_base)
                row["drift"] = round(base_accuracy["mean"] - row["single_accuracy"]["mean"], 4)
            else:
                row.update(judge_texture(images, prompts, what))
        finally:
            unload_adapters(pipe, [name])
        grid[name] = images[:10]
        rows.append(row)
    return rows


def verdict(row: dict) -> list[str]:
    """The bars a row misses (empty: it passes)."""
    keys = ("emblem", "position", "background") if row["kind"] == "emblem" else ("texture", "shape", "colour",
                                                                                 "position")
    missed = [k for k in keys if row[k] < (FOUND_BAR if k in ("emblem", "texture") else PLACE_BAR)]
    if row["kind"] == "emblem" and row["drift"] > DRIFT_BAR:
        missed.append("drift")
    if row["seconds"] > SECONDS_BAR:
        missed.append("seconds")
    return missed


def bench_generate_fn(model: str, steps: int, device: str = "cpu") -> GenerateFn:
    """The bench's generation: the cached pipeline of `model` as it stands (adapters loaded or not), in batches."""
    from studio.generate import GenerateConfig, cached_pipeline, generate

    pipe = cached_pipeline(model, device)

    def generate_fn(prompts: list[str], seeds: list[int]) -> list[torch.Tensor]:
        images = []
        for at in range(0, len(prompts), BATCH):
            texts, batch_seeds = prompts[at:at + BATCH], seeds[at:at + BATCH]
            config = GenerateConfig(prompt=texts[0], model=model, steps=steps, num_images=len(texts), device=device)
            images += list(generate(config, pipe=pipe, output_type="pt", prompts=texts, seeds=batch_seeds).images)
        return images  # (3, H, W) each, in [0, 1]

    return generate_fn


def base_single_accuracy(model: str, n_base: int, steps: int, device: str = "cpu") -> dict:
    """The base's trigger-free single-object accuracy (no adapter loaded): the reference of every adapter's drift."""
    return single_accuracy(bench_generate_fn(model, steps, device), n_base)


def run_bench(model: str, methods: list[str], out: Path, *, steps: int = 20, n_base: int = 50, n_texture: int = 20,
              texture: str | None = "stripes", overrides: dict | None = None, n_emblems: int = 3,
              device: str = "cpu", base: dict | None = None, n_emblem: int | None = None) -> dict:
    """Train, generate and judge on `device`; write the table, JSON and grid; return the report.

    `base`: the base's accuracy (`base_single_accuracy` at the same model, `n_base`, steps and device) when the caller
    computed it already, e.g. once for every method of `studio bench report`; measured here otherwise. `n_emblem`:
    the first that many of each emblem's placements (default all 20; fewer only where the figures do not matter)."""
    from studio.generate import cached_pipeline

    library = out / "library"
    pipe = cached_pipeline(model, device)
    overrides = {"device": device, **(overrides or {})}
    generate_fn = bench_generate_fn(model, steps, device)

    grid: dict[str, list[torch.Tensor]] = {}
    one_image = [m for m in methods if m == "b_lora"]  # its own rows: one image split into content and style
    methods = [m for m in methods if m not in one_image]
    b_rows = []
    if one_image:
        from benches.b_lora import bar_rows

        b_rows = bar_rows(model, library, generate_fn, pipe, overrides or {}, grid, n_texture)
        if not methods:
            report = {"model": model, "threads": torch.get_num_threads(), "steps": steps, "b_lora": b_rows,
                      "passed": {"b_lora": not any(r["missed"] for r in b_rows)}}
            _write_b_lora(out, report, grid)
            return report
    base_accuracy = base if base is not None else single_accuracy(generate_fn, n_base)
    rows = []
    for method in methods:
        rows += method_rows(method, model, library, generate_fn, pipe, overrides, base_accuracy, n_base,
                            n_texture, texture, eval_emblems(n_emblems), grid, n_emblem or EMBLEM_PROMPTS)
    reference = {r["concept"]: r["trainable_params"] for r in rows if r["method"] == REFERENCE}
    if not reference:
        reference = dict.fromkeys((r["concept"] for r in rows), reference_params(model))
    for r in rows:
        r["params_ratio"] = round(r["trainable_params"] / reference[r["concept"]], 4)
        r["missed"] = verdict(r)
    passed = {m: not any(r["missed"] for r in rows if r["method"] == m) for m in methods}
    report = {"model": model, "device": _device_name(device), "threads": torch.get_num_threads(), "steps": steps,
              "base_accuracy": base_accuracy,
              "bars": {"found": FOUND_BAR, "place": PLACE_BAR, "drift": DRIFT_BAR, "seconds": SECONDS_BAR},
              "rows": rows, "passed": passed,
              "overrides": {k: v for k, v in overrides.items() if k != "device"}}  # training settings changed
    if b_rows:
        report["b_lora"] = b_rows
        report["passed"]["b_lora"] = not any(r["missed"] for r in b_rows)
    _write(out, report, grid)
    return report


def _device_name(device: str) -> str:
    return torch.cuda.get_device_name() if device == "cuda" else f"cpu, {torch.get_num_threads()} threads"


def _write_b_lora(out: Path, report: dict, grid: dict[str, list[torch.Tensor]]) -> None:
    from benches.b_lora import bar_table
    from studio.atomic import write_json, write_text

    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "adapters-bench.json", report)
    lines = [*bar_table(report["b_lora"]), "", f"{report['threads']} threads, {report['steps']} sampling steps.", "",
             f"- b_lora: {'passes' if report['passed']['b_lora'] else 'misses'} the bar"]
    write_text(out / "adapters-bench.md", "\n".join(lines) + "\n")
    save_grid(out / "adapters-bench-grid.png", list(grid.values()))


def _write(out: Path, report: dict, grid: dict[str, list[torch.Tensor]]) -> None:

    from studio.atomic import write_json, write_text

    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "adapters-bench.json", report)
    lines = [
        "| method | concept | train s | params (ratio) | found | position | background | shape | colour | drift "
        "| missed |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["rows"]:
        found = r.get("emblem", r.get("texture"))
        cells = [r["method"], f"{r['kind']} {r['concept']}", f"{r['seconds']:.0f}",
                 f"{r['trainable_params']:,} ({r['params_ratio']:.2f})", f"{found:.2f}", f"{r['position']:.2f}",
                 *(f"{r[k]:.2f}" if k in r else "" for k in ("background", "shape", "colour")),
                 f"{r['drift']:+.3f}" if "drift" in r else "", ", ".join(r["missed"]) or "none"]
        lines.append("| " + " | ".join(cells) + " |")
    base = report["base_accuracy"]
    lines += ["", f"Base single-object accuracy (mean of {', '.join(ACCURACY_KEYS)}): {base['mean']:.3f}; drift is "
              f"its drop with the adapter loaded and the trigger absent. {report['device']}, "
              f"{report['steps']} sampling steps."
              + (f" Training overrides: {_overrides(report['overrides'])}." if report.get("overrides") else ""), "",
              *(f"- {m}: {'passes' if ok else 'misses'} the bar" for m, ok in report["passed"].items())]
    if "b_lora" in report:
        from benches.b_lora import bar_table

        lines += ["", "B-LoRA (one image, content and style entries):", "", *bar_table(report["b_lora"])]
    write_text(out / "adapters-bench.md", "\n".join(lines) + "\n")
    save_grid(out / "adapters-bench-grid.png", list(grid.values()))


def _overrides(overrides: dict) -> str:
    """`{"train_steps": 175, "batch_size": 8}` as the CLI flags that set them: `--train-steps 175 --batch-size 8`."""
    return " ".join(f"--{k.replace('_', '-')}" + ("" if v is True else f" {v:g}" if isinstance(v, float) else f" {v}")
                    for k, v in overrides.items())


def run(args: argparse.Namespace) -> int:
    torch.set_num_threads(args.threads)
    if args.sweep:
        from benches.b_lora import sweep

        sweep(args.model, Path(args.out), train_steps=600 if args.train_steps is None else args.train_steps,
              n=args.sweep_prompts, steps=args.steps)
        print((Path(args.out) / "b-lora-sweep.md").read_text())
        return 0
    overrides = {k: v for k, v in (("train_steps", args.train_steps), ("batch_size", args.batch_size),
                                   ("lr", args.lr)) if v is not None}
    from trainers import TrainConfig

    TrainConfig(trigger="sks", name="bench", world_emblem=1, **overrides)  # refused now, not after the base is judged
    if args.cuda_graphs:
        overrides["cuda_graphs"] = True
    from trainers import METHODS

    report = run_bench(args.model, args.method or list(METHODS), Path(args.out), steps=args.steps,
                       n_base=args.base_prompts, texture=None if args.no_texture else args.texture,
                       overrides=overrides, n_emblems=args.emblems, device=args.device)
    print((Path(args.out) / "adapters-bench.md").read_text())
    return 0 if all(report["passed"].values()) else 1


def register_bench(benches: argparse._SubParsersAction) -> None:
    from studio.world.textures import TEXTURES

    parser = benches.add_parser("adapters", help="adapters trained at their defaults against the trainer bar")
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--method", action="append", help="a method (repeatable; default: every method)")
    parser.add_argument("--texture", default="stripes", choices=list(TEXTURES[1:]), help="the style adapter's texture")
    parser.add_argument("--train-steps", type=int, default=None, help="override the default steps (not the bar)")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="override the default training batch (not the bar; e.g. a GPU's larger batch)")
    parser.add_argument("--lr", type=float, default=None, help="override the method's learning rate (not the bar)")
    parser.add_argument("--base-prompts", type=int, default=50, help="single-object prompts for the drift check")
    parser.add_argument("--steps", type=int, default=20, help="sampling steps")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--emblems", type=int, default=3, choices=range(1, len(TRIGGERS) + 1),
                        help="emblem adapters per method (the bar: 3)")
    parser.add_argument("--no-texture", action="store_true", help="skip the texture (style) adapter")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                        help="train and generate here (the bar's seconds are for 2 CPU cores)")
    parser.add_argument("--cuda-graphs", action="store_true",
                        help="train with `studio train --cuda-graphs` (the UNet's step recorded; GPU only)")
    parser.add_argument("--sweep", action="store_true", help="B-LoRA: measure candidate content/style block pairs")
    parser.add_argument("--sweep-prompts", type=int, default=10, help="prompts per measurement of the sweep")
    parser.add_argument("--out", default="bench-out/adapters")
    parser.set_defaults(func=run)

