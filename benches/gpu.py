"""`studio bench gpu`: the studio's speed on a GPU, side by side in one run.

- Generation: milliseconds per image at batch 1, 16 and 128 (20 steps, the model's guidance), with each denoising
  step replayed as a recorded CUDA graph and with plain launches (`--no-cuda-graphs`); median of `--runs` timed
  calls after a warm-up call that also records the graphs, CUDA synchronised around each call.
- Composition (`--no-composition` skips it): milliseconds per image at batch 1 with one adapter by its tag and with
  two adapters in their boxes by LoRA-Composer (the bar: at most 1.25x the one adapter), and a batch of one-image
  jobs with four adapters as one batched call (`studio batch --group`) against one call per job. The adapters are
  DreamBooth-LoRA at its default targets with random weights, written to a temporary library.
- Training: DreamBooth-LoRA on a Shapes World emblem at the defaults on the GPU, with the UNet's forward and backward
  recorded as CUDA graphs (`studio train --cuda-graphs`, `trainers.graphs`) and with plain launches: seconds per
  optimizer step from a run of `--train-steps` steps and one a quarter as long (after a warm-up run that caches the
  class images), and a default-length run's seconds projected from them (class images from the cache).

`--architecture sd1` (or sd2, sdxl) runs generation and composition on a base of that architecture with random
weights (`benches.random_base`): real sizes, nothing downloaded.

Writes `gpu-bench.json` and `gpu-bench.md` to `--out` after each section, in this order: a section that fails is
recorded with its error while the others still run, and a run cut short keeps what it measured. Both open with the
speed goals (`GOALS`) that the run measured, each with its figure and whether it is met.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from studio.models import DEFAULT_MODEL


DEFAULT_BATCHES = [1, 16, 128]
# The studio's GPU speed goals: (section, what is measured, the most it may be). Generation and training are goals on
# the embedded base (20 steps; the default-length emblem run, whose fidelity `studio bench adapters --device cuda`
# checks); the regional ratio holds on any base.
GOALS = (
    ("generation", f"{DEFAULT_MODEL}, batch 1, 20 steps, CUDA graphs: ms per image", 60.0),
    ("training", f"{DEFAULT_MODEL}, DreamBooth-LoRA emblem, default run: projected s (the faster step mode)", 30.0),
    ("composition", "two adapters in their boxes (LoRA-Composer) over one adapter: time ratio", 1.25),
)


def _median_ms(config: Any, pipe: Any, runs: int) -> float:
    """Median milliseconds of `runs` calls of `generate(config)` (seeds 0...), CUDA synchronised around each, after
    a warm-up call (which also records the CUDA graphs)."""
    from studio.generate import generate

    generate(config, pipe=pipe)
    times = []
    for seed in range(runs):
        config.seed = seed
        torch.cuda.synchronize()
        start = time.perf_counter()
        generate(config, pipe=pipe, output_type="pt")
        torch.cuda.synchronize()
        times.append(1000 * (time.perf_counter() - start))
    return statistics.median(times)


def generation(model: str, batches: list[int], runs: int, steps: int) -> list[dict]:
    from studio.generate import GenerateConfig, cached_pipeline

    pipe = cached_pipeline(model, "cuda")
    prompt = "a large red star on the left on a white background"
    rows = []
    for batch in batches:
        row: dict = {"batch": batch}
        for graphs in (True, False):
            config = GenerateConfig(prompt=prompt, model=model, steps=steps, num_images=batch, device="cuda",
                                    cuda_graphs=graphs)
            row["graphs" if graphs else "plain"] = round(_median_ms(config, pipe, runs) / batch, 3)
        row["speedup"] = round(row["plain"] / row["graphs"], 2)
        rows.append(row)
    if batches[0] == 1 and steps > 2:
        # Where batch 1's time goes, with graphs: a 2-step call against the full one gives ms per denoising step
        # and the fixed part of a call (prompt encoding, set-up, the VAE decode, the host's work around them).
        short = _median_ms(GenerateConfig(prompt=prompt, model=model, steps=2, device="cuda"), pipe, runs)
        per_step = (rows[0]["graphs"] - short) / (steps - 2)
        rows[0].update(ms_per_step=round(per_step, 3), fixed_ms=round(rows[0]["graphs"] - per_step * steps, 2))
    return rows


def training(model: str, steps: int) -> dict:
    """Seconds per optimizer step from two runs of different lengths (no per-step callback: one would make the loop
    wait for the GPU at every step), after a warm-up run that also caches the class images; with the UNet's step
    recorded as CUDA graphs (`--cuda-graphs`) and with plain launches, side by side."""
    from trainers import TrainConfig, train

    def run_for(n: int, name: str, library: str, graphs: bool) -> float:
        config = TrainConfig(trigger="sks", name=name, world_emblem=3, model=model, train_steps=n, sample_every=0,
                             save_every=0, device="cuda", progress=False, cuda_graphs=graphs,
                             run_dir=str(Path(library) / ".runs" / name))
        torch.cuda.synchronize()
        start = time.perf_counter()
        train("dreambooth_lora", config, library=_library(library))
        torch.cuda.synchronize()
        return time.perf_counter() - start

    default = TrainConfig(trigger="sks", name="gpu-bench", world_emblem=3).train_steps
    report: dict = {"method": "dreambooth_lora", "steps": steps, "default_steps": default}
    with tempfile.TemporaryDirectory() as library:
        run_for(2, "gpu-warm", library, False)
        short_steps = max(1, steps // 4)
        for mode in ("graphs", "plain"):
            short = run_for(short_steps, f"gpu-short-{mode}", library, mode == "graphs")
            whole = run_for(steps, f"gpu-long-{mode}", library, mode == "graphs")
            per_step = (whole - short) / (steps - short_steps)
            fixed = whole - per_step * steps  # model load, latents, class images from the cache, recording, previews
            report[mode] = {"s_per_step": round(per_step, 4), "run_s": round(whole, 1), "fixed_s": round(fixed, 1),
                            "projected_default_run_s": round(fixed + per_step * default, 1)}
    report["speedup"] = round(report["plain"]["s_per_step"] / report["graphs"]["s_per_step"], 2)
    return report


TRIGGERS = ("sks", "zwx", "qrv", "vgl")


def _random_adapters(model: str, root: str, n: int) -> list[str]:
    """`n` DreamBooth-LoRA adapters at the method's defaults (every default target, UNet and text encoder) with
    random non-zero B, in the library at `root`: real shapes, so they cost what trained ones cost."""
    from studio.models import load_pipeline
    from trainers import DreamBoothLoRA

    library, names = _library(root), []
    pipe, method = load_pipeline(model), DreamBoothLoRA()
    for part in (pipe.unet, pipe.text_encoder):
        part.requires_grad_(False)
    method.attach(pipe)  # once: each adapter is the same layers with other random factors
    for i in range(n):
        torch.manual_seed(i)
        for key, p in method.trainable_tensors().items():
            p.data.normal_(0, 0.02 if "lora_B" in key else 1 / p.shape[0])
        tensors, meta = method.export()
        meta.trigger_words, meta.kind = [TRIGGERS[i]], "subject"
        library.add(f"bench-gpu-{i}", tensors, meta)
        names.append(f"bench-gpu-{i}")
    return names


def composition(model: str, device: str, runs: int, steps: int, jobs: int = 16) -> dict:
    """Milliseconds per image, side by side: one adapter by its tag (batch 1), kept warm between calls and loaded
    afresh each call; two adapters in their boxes with LoRA-Composer (batch 1), its steps recorded as CUDA graphs
    (on a GPU) and with plain launches, without the latent re-initialisation, and its installation and removal
    alone (where a regional call's time goes beside sampling); `jobs` one-image jobs with four adapters, one batched
    call (`studio batch --group`) and one call per job."""
    import os

    import composers
    import studio.library.load as load
    from studio.batch import read_jobs, run_batch
    from studio.generate import GenerateConfig, cached_pipeline, generate

    def timed(fn: Any) -> float:
        fn()  # warm-up
        times = []
        for _ in range(runs):
            _sync(device)
            start = time.perf_counter()
            fn()
            _sync(device)
            times.append(time.perf_counter() - start)
        return statistics.median(times)

    before = os.environ.get("STUDIO_LIBRARY")
    with tempfile.TemporaryDirectory() as root:
        os.environ["STUDIO_LIBRARY"] = root  # `<lora:...>` tags load from the default library
        try:
            names = _random_adapters(model, root, 4)
            pipe = cached_pipeline(model, device)
            one = GenerateConfig(prompt=f"a large {TRIGGERS[0]} emblem on the left <lora:{names[0]}>", model=model,
                                 steps=steps, device=device)
            two = GenerateConfig(prompt=f"a large {TRIGGERS[0]} emblem on the left and a large {TRIGGERS[1]} "
                                 "emblem on the right", model=model, steps=steps, device=device)
            pair = composers.AdapterSet.parse(f"{names[0]},{names[1]}")
            single = timed(lambda: generate(one, pipe=pipe, output_type="pt"))
            keep, load.WARM = load.WARM, 0  # no adapter kept: injected and unloaded every call, as before warm ones
            try:
                cold = timed(lambda: generate(one, pipe=pipe, output_type="pt"))
            finally:
                load.WARM = keep
            regional = timed(lambda: composers.compose(two, pair, "lora_composer", pipe=pipe, output_type="pt"))
            unrecorded = dataclasses.replace(two, cuda_graphs=False)  # its steps with plain launches
            regional_plain = timed(lambda: composers.compose(unrecorded, pair, "lora_composer", pipe=pipe,
                                                             output_type="pt"))
            no_reinit = composers.LoraComposerConfig(reinit=False)  # without §3.5's extra forward at step 0
            regional_no_reinit = timed(lambda: composers.compose(two, pair, "lora_composer", no_reinit, pipe=pipe,
                                                                 output_type="pt"))

            def set_up() -> None:  # what a regional call does beside sampling: install, then remove
                config = composers.make_config("lora_composer").with_layout(two.prompt, pair)
                composers.apply(pipe, pair, "lora_composer", config.for_prompt(two.prompt)).remove()

            regional_set_up = timed(set_up)
            lines = [json.dumps({"prompt": f"a large {TRIGGERS[i % 4]} emblem <lora:{names[i % 4]}:{0.5 + i % 3 / 4}>",
                                 "seed": i, "model": model, "steps": steps, "device": device}) for i in range(jobs)]
            job_file = Path(root) / "jobs.jsonl"
            job_file.write_text("\n".join(lines) + "\n")

            def batch(group: int) -> None:
                out = Path(root) / f"out-{group}"
                for png in out.glob("*.png"):
                    png.unlink()
                run_batch(read_jobs(job_file), out, progress=False, group=group)

            grouped, alone = timed(lambda: batch(jobs)), timed(lambda: batch(1))
        finally:
            os.environ.pop("STUDIO_LIBRARY") if before is None else os.environ.update(STUDIO_LIBRARY=before)
    return {"single_ms": round(1000 * single, 1), "single_cold_ms": round(1000 * cold, 1),
            "warm_speedup": round(cold / single, 2), "lora_composer_ms": round(1000 * regional, 1),
            "lora_composer_ratio": round(regional / single, 2),
            "lora_composer_plain_ms": round(1000 * regional_plain, 1),
            "lora_composer_no_reinit_ms": round(1000 * regional_no_reinit, 1),
            "lora_composer_set_up_ms": round(1000 * regional_set_up, 1), "jobs": jobs,
            "mixed_grouped_ms": round(1000 * grouped / jobs, 2), "mixed_alone_ms": round(1000 * alone / jobs, 2),
            "mixed_speedup": round(alone / grouped, 2)}


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _library(root: str):  # -> studio.library.Library
    from studio.library import Library

    return Library(root)


def run(args: argparse.Namespace) -> int:
    """Each section in turn (generation, composition, training), the report rewritten after each: a section that
    fails is recorded with its error and the others still run, and a run cut short keeps what it measured. Exit 1
    when a section failed."""
    from studio.errors import StudioError

    if not torch.cuda.is_available():
        raise StudioError("studio bench gpu needs a CUDA device; `studio bench generate` measures the CPU")
    report: dict[str, Any] = {"device": torch.cuda.get_device_name(), "model": args.model, "steps": args.steps,
                              "runs": args.runs, "training_model": args.model}
    with tempfile.TemporaryDirectory() as folder:
        model = args.model
        if args.architecture:  # generation and composition at a published architecture's sizes (random weights)
            from benches.random_base import random_base

            model = str(random_base(args.architecture, Path(folder) / f"random-{args.architecture}"))
            report["model"] = f"{args.architecture} architecture, random weights (training: {args.model})"
        return _sections(args, model, report)


def _sections(args: argparse.Namespace, model: str, report: dict[str, Any]) -> int:
    import traceback

    sections = [("generation", lambda: generation(model, args.batch, args.runs, args.steps))]
    if args.composition:
        sections.append(("composition", lambda: composition(model, "cuda", args.runs, args.steps, args.jobs)))
    if args.train_steps:
        sections.append(("training", lambda: training(args.model, args.train_steps)))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    failed = []
    for name, measure in sections:
        try:
            report[name] = measure()
        except Exception as err:  # noqa: BLE001 - one section's failure must not cost the others their numbers
            traceback.print_exc()
            report[name] = {"error": f"{type(err).__name__}: {err}".strip().splitlines()[0]}
            failed.append(name)
        report["goals"] = goals(report)
        _write(out, report)
    print(markdown(report))
    return 1 if failed else 0


def _write(out: Path, report: dict) -> None:
    from studio.atomic import write_json, write_text

    write_json(out / "gpu-bench.json", report)
    write_text(out / "gpu-bench.md", markdown(report) + "\n")


def goals(report: dict) -> list[dict]:
    """Each goal of `GOALS` this report measured: {"goal", "measured", "most", "met"}. Generation counts only on the
    embedded base at 20 steps, training only when it trained the embedded base."""
    measured: dict[str, float] = {}
    rows, c, t = report.get("generation"), report.get("composition"), report.get("training")
    if isinstance(rows, list) and report.get("model") == DEFAULT_MODEL and report.get("steps") == 20:
        measured.update({"generation": r["graphs"] for r in rows if r.get("batch") == 1})
    if isinstance(c, dict) and "lora_composer_ratio" in c:
        measured["composition"] = c["lora_composer_ratio"]
    if isinstance(t, dict) and "speedup" in t and report.get("training_model") == DEFAULT_MODEL:
        measured["training"] = min(t[mode]["projected_default_run_s"] for mode in ("graphs", "plain"))
    return [{"goal": goal, "measured": measured[name], "most": most, "met": measured[name] <= most}
            for name, goal, most in GOALS if name in measured]


def markdown(report: dict) -> str:
    """The report as Markdown tables; a failed section as its error."""
    lines = [f"# studio bench gpu ({report['device']}, {report['model']}, {report['steps']} steps, median of "
             f"{report['runs']})"]
    if report.get("goals"):
        lines += ["", "| goal | measured | at most | met |", "|---|---|---|---|"]
        lines += [f"| {g['goal']} | {g['measured']} | {g['most']} | {'yes' if g['met'] else 'no'} |"
                  for g in report["goals"]]
    for name in ("generation", "composition", "training"):
        if isinstance(report.get(name), dict) and "error" in report[name]:
            lines += ["", f"{name.capitalize()} failed: {report[name]['error']}"]
    rows = report.get("generation")
    if isinstance(rows, list):
        lines += ["", "| batch | ms/image, CUDA graphs | ms/image, plain | speed-up |", "|---|---|---|---|"]
        lines += [f"| {r['batch']} | {r['graphs']} | {r['plain']} | {r['speedup']}x |" for r in rows]
        if "ms_per_step" in rows[0]:
            lines += ["", f"Batch 1 with graphs: {rows[0]['ms_per_step']} ms per denoising step and "
                          f"{rows[0]['fixed_ms']} ms fixed per call (prompt encoding, set-up, VAE decode; from a "
                          "2-step call beside the full one)."]
    c = report.get("composition", {})
    if "single_ms" in c:
        lines += ["", "| batch 1 | ms/image |", "|---|---|", f"| one adapter (tag) | {c['single_ms']} |",
                  f"| one adapter (tag), injected afresh every call | {c['single_cold_ms']} ({c['warm_speedup']}x "
                  "the warm one) |",
                  f"| two adapters in boxes (lora_composer) | {c['lora_composer_ms']} ({c['lora_composer_ratio']}x) |",
                  f"| the same, steps with plain launches | {c.get('lora_composer_plain_ms', '-')} |",
                  f"| the same, no latent re-initialisation (one forward fewer) | "
                  f"{c.get('lora_composer_no_reinit_ms', '-')} |",
                  f"| its installation and removal alone (no sampling) | {c.get('lora_composer_set_up_ms', '-')} |",
                  "", f"{c['jobs']} one-image jobs, four adapters: {c['mixed_grouped_ms']} ms/image in one batched "
                  f"call, {c['mixed_alone_ms']} one call per job ({c['mixed_speedup']}x)."]
    t = report.get("training", {})
    if "speedup" in t:
        lines += ["", f"Training (DreamBooth-LoRA, world emblem, {t['steps']} steps timed; a default run is "
                      f"{t['default_steps']} steps):", "",
                  "| UNet step | s/step | default run, projected s | fixed s |", "|---|---|---|---|"]
        lines += [f"| {label} | {t[mode]['s_per_step']} | {t[mode]['projected_default_run_s']} | "
                  f"{t[mode]['fixed_s']} |" for mode, label in (("graphs", "CUDA graphs"), ("plain", "plain"))]
        lines += ["", f"Speed-up per step: {t['speedup']}x."]
    return "\n".join(lines)


def register_bench(benches: argparse._SubParsersAction) -> None:
    parser = benches.add_parser("gpu", help="generation ms/image (CUDA graphs vs plain) and training s/step on a GPU")
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--batch", type=int, action="append", help="batch sizes (repeatable; default 1, 16, 128)")
    parser.add_argument("--steps", type=int, default=20, help="sampling steps")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--train-steps", type=int, default=60, help="training steps timed (0: no training)")
    parser.add_argument("--no-composition", dest="composition", action="store_false",
                        help="skip the composition rows (one adapter, two in boxes, a mixed batch)")
    parser.add_argument("--jobs", type=int, default=16, help="one-image jobs of the mixed-adapter batch row")
    parser.add_argument("--architecture", choices=("sd1", "sd2", "sdxl"), default=None,
                        help="generation and composition on a base of this architecture with random weights (built "
                             "in a temporary folder; SD1.5 sizes where studio-tiny is launch-bound); training keeps "
                             "--model")
    parser.add_argument("--out", default="bench-out/gpu")
    parser.set_defaults(func=lambda args: run(argparse.Namespace(**{**vars(args),
                                                                    "batch": args.batch or DEFAULT_BATCHES})))
