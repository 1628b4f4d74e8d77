"""`studio bench train`: per method, trainable parameters, memory and seconds per step, side by side in one run.

Each method trains in a fresh process (so its peak resident memory is its own) on a Shapes World emblem, into a
throw-away library. Reported per method: trainable parameters; the bytes of trainable parameters, their gradients
and AdamW's two moments; peak memory (GPU: `torch.cuda.max_memory_allocated`; CPU: the process's peak RSS); the
median seconds per optimizer step after the first (warm-up) step; and the ratio of each method's figures to the
first method's.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

from studio.models import DEFAULT_MODEL


# One batch of the class-image renderer (`trainers.prior.BATCH`): each step draws its prior batch from them whatever
# their count, so the per-step time is that of the trainer's default 50 and the peak memory differs only by the 40
# images it does not hold (3 x R x R floats each, 2 MB at studio-tiny's 64 px); the bench does not wait for 40
# renders it never times (on the suite's tiny model they were half of this bench's time).
CLASS_IMAGES = 10

_CHILD = """
import json, resource, sys, time, torch
from trainers import Callbacks, TrainConfig, train
args = json.loads(sys.argv[1])
torch.set_num_threads(args["threads"])
marks = []
config = TrainConfig(trigger="sks", name="bench-" + args["method"], world_emblem=3, model=args["model"],
                     train_steps=args["steps"], sample_every=0, save_every=0, seed=0, device=args["device"],
                     num_class_images=args["class_images"])
on_step = lambda step, loss: marks.append(time.perf_counter())
result = train(args["method"], config, callbacks=Callbacks(on_step=on_step))
tensors = result.method.trainable_tensors()
n = sum(t.numel() for t in tensors.values())
nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
gpu = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None
print(json.dumps({"marks": marks, "params": n, "param_bytes": nbytes, "gpu_peak_bytes": gpu,
                  "rss_peak_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
"""


def measure(method: str, model: str, steps: int, threads: int, device: str = "auto",
            class_images: int = CLASS_IMAGES) -> dict[str, object]:
    """Train `method` for `steps` steps in a fresh process and return its figures."""
    from studio.errors import StudioError

    with tempfile.TemporaryDirectory() as library:
        env = {**os.environ, "STUDIO_LIBRARY": library}
        args = json.dumps({"method": method, "model": model, "steps": steps, "threads": threads, "device": device,
                           "class_images": class_images})
        done = subprocess.run([sys.executable, "-c", _CHILD, args], capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise StudioError(f"training {method} failed: {done.stderr.strip().splitlines()[-1]}")
    child = json.loads(done.stdout.strip().splitlines()[-1])
    marks = child["marks"]
    per_step = [b - a for a, b in zip(marks, marks[1:])]  # the first step (warm-up) has no predecessor
    return {
        "method": method,
        "trainable_params": child["params"],
        "bytes": {
            "params": child["param_bytes"],
            "grads": child["param_bytes"],
            "adamw_state": 2 * child["param_bytes"],
            "total": 4 * child["param_bytes"],
        },
        "peak_memory_bytes": child["gpu_peak_bytes"] or child["rss_peak_bytes"],
        "peak_memory_kind": "gpu max allocated" if child["gpu_peak_bytes"] else "cpu peak rss of a fresh process",
        "s_per_step_median": round(statistics.median(per_step), 4) if per_step else None,
        "steps_timed": len(per_step),
    }


def run(args: argparse.Namespace) -> int:
    from trainers import METHODS

    methods = args.method or list(METHODS)
    start = time.perf_counter()
    rows = [measure(m, args.model, args.steps, args.threads, args.device, args.num_class_images) for m in methods]
    first = rows[0]
    for row in rows:
        row["params_ratio"] = round(row["trainable_params"] / first["trainable_params"], 4)
        if row["s_per_step_median"] and first["s_per_step_median"]:
            row["time_ratio"] = round(row["s_per_step_median"] / first["s_per_step_median"], 3)
    report = {"model": args.model, "steps": args.steps, "threads": args.threads,
              "num_class_images": args.num_class_images, "rows": rows,
              "seconds": round(time.perf_counter() - start, 1)}
    print(json.dumps(report, indent=2))
    return 0


def register_bench(benches: argparse._SubParsersAction) -> None:
    parser = benches.add_parser("train", help="per method: trainable parameters, memory and seconds per step")
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--method", action="append", help="a method to measure (repeatable; default all)")
    parser.add_argument("--steps", type=int, default=6, help="optimizer steps per method (the first is warm-up)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--num-class-images", type=int, default=CLASS_IMAGES,
                        help="class images for the emblem's prior preservation (per-step figures do not depend on it)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                        help="auto: a GPU when there is one")
    parser.set_defaults(func=run)
