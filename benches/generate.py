"""`studio bench generate`: generation speed on this machine.

Median seconds per image over `--runs` generations in one process after a warm-up, with the thread count, and the
cost of starting a process (interpreter, imports, model load) measured separately in a fresh subprocess.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

from studio.configs import finite_type
from studio.models import DEFAULT_MODEL


def measure(model: str, steps: int, guidance: float | None, runs: int, size: str | None) -> dict[str, object]:
    import torch

    from studio.generate import GenerateConfig, cached_pipeline, generate

    start = time.perf_counter()
    pipe = cached_pipeline(model, "cpu")
    load = time.perf_counter() - start
    config = GenerateConfig(prompt="a large red star on the left on a white background", model=model, steps=steps,
                            guidance=guidance, size=size)
    generate(config, pipe=pipe)  # warm-up
    times = []
    for seed in range(runs):
        config.seed = seed
        start = time.perf_counter()
        generate(config, pipe=pipe)
        times.append(time.perf_counter() - start)
    code = (
        "import time; t = time.perf_counter(); from studio.generate import cached_pipeline; "
        f"cached_pipeline({model!r}, 'cpu'); print(time.perf_counter() - t)"
    )
    start = time.perf_counter()
    child = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    process_wall = time.perf_counter() - start
    return {
        "model": model,
        "steps": steps,
        "guidance": guidance,
        "size": size or "native",
        "threads": torch.get_num_threads(),
        "runs": runs,
        "median_s_per_image": round(statistics.median(times), 4),
        "min_s": round(min(times), 4),
        "max_s": round(max(times), 4),
        "model_load_s": round(load, 3),
        "process_start_s": {"imports_and_load": round(float(child.stdout.strip()), 3),
                            "whole_process": round(process_wall, 3)},
    }


def register_bench(benches: argparse._SubParsersAction) -> None:
    parser = benches.add_parser("generate", help="seconds per image (median after a warm-up) and process start")
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--guidance", type=finite_type("--guidance"), default=None,
                        help="default the model's recommended one")
    parser.add_argument("--size", default=None, help="WxH, default the model's native size")
    parser.add_argument("--runs", type=int, default=10)
    parser.set_defaults(func=lambda args: print(json.dumps(
        measure(args.model, args.steps, args.guidance, args.runs, args.size), indent=2)) or 0)
