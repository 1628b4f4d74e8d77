"""`studio bench memory`: the generation memory estimate (`studio.memory`) against the measured peak.

Each case runs in a fresh process: load the pipeline, warm it up at the native size, reset the kernel's peak-RSS mark
(`/proc/self/clear_refs`), generate, and read the new peak (VmHWM). The estimate should sit above the measurement
(ratio measured / estimated at most 1) without being far above it. Last, the refusal: how long `studio generate`
takes to refuse a request that cannot fit (`--size 20000x20000`) and what it says.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

from studio.models import DEFAULT_MODEL


_CHILD = """
import json, sys, torch
torch.set_num_threads({threads})
from studio.generate import GenerateConfig, cached_pipeline, generate, memory_plan

def status(key):
    return int(next(l for l in open('/proc/self/status') if l.startswith(key)).split()[1]) * 1024

pipe = cached_pipeline({model!r}, 'cpu')
pipe.set_progress_bar_config(disable=True)
generate(GenerateConfig(prompt='a red star', model={model!r}, steps=1), pipe=pipe)  # warm-up at the native size
config = GenerateConfig(prompt='a large red star on the left', model={model!r}, steps={steps}, size={size!r},
                        num_images={num_images}, vae_tiling={tiling})
plan = memory_plan(config, pipe)
open('/proc/self/clear_refs', 'w').write('5')  # reset the peak-RSS mark
before = status('VmRSS')
result = generate(config, pipe=pipe)
print(json.dumps({{'estimated': plan.total, 'measured': status('VmHWM') - before, 'parts': plan.parts,
                  'vae_tiling': result.params[0]['vae_tiling']}}))
"""


def measure_case(model: str, size: str, num_images: int, tiling: bool, steps: int, threads: int) -> dict:
    code = _CHILD.format(model=model, size=size, num_images=num_images, tiling=tiling, steps=steps, threads=threads)
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    if done.returncode:
        return {"model": model, "size": size, "error": done.stderr.strip().splitlines()[-1:]}
    row = json.loads(done.stdout.strip().splitlines()[-1])
    ratio = row["measured"] / row["estimated"]
    return {"model": model, "size": size, "num_images": num_images, "vae_tiling": row["vae_tiling"],
            "estimated_mb": round(row["estimated"] / 2**20, 1), "measured_mb": round(row["measured"] / 2**20, 1),
            "measured_over_estimated": round(ratio, 3), "seconds": round(time.perf_counter() - start, 1)}


def refusal(model: str) -> dict:
    """Wall time and message of `studio generate --size 20000x20000` (refused before sampling)."""
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "studio", "generate", "--model", model, "--prompt", "a red star",
                           "--size", "20000x20000", "--out", "/dev/null/never.png"], capture_output=True, text=True)
    return {"exit_status": done.returncode, "seconds": round(time.perf_counter() - start, 2),
            "message": done.stderr.strip().splitlines()[-1] if done.stderr.strip() else ""}


def run(models: list[str], sizes: list[str], num_images: int, steps: int, threads: int) -> dict:
    rows = []
    for model in models:
        for size in sizes:
            for tiling in (False, True):
                rows.append(measure_case(model, size, num_images, tiling, steps, threads))
                print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    ratios = [r["measured_over_estimated"] for r in rows if "measured_over_estimated" in r]
    return {"threads": threads, "steps": steps, "cases": rows,
            "ratio_min": min(ratios, default=None), "ratio_max": max(ratios, default=None),
            "refusal": refusal(models[0])}


def register_bench(benches: argparse._SubParsersAction) -> None:
    parser = benches.add_parser("memory", help="generation memory: estimate against measured peak RSS, refusal time")
    parser.add_argument("--models", default=DEFAULT_MODEL, help="comma-separated models")
    parser.add_argument("--sizes", default="256x256,512x512,1024x1024", help="comma-separated WxH")
    parser.add_argument("--num-images", type=int, default=1)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.set_defaults(func=lambda args: print(json.dumps(run(
        args.models.split(","), args.sizes.split(","), args.num_images, args.steps, args.threads), indent=2)) or 0)
