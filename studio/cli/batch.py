"""`studio batch JOBS.jsonl --out DIR`: a job file of generations; `accelerate launch -m studio batch` shards it."""

from __future__ import annotations

import argparse
import json
import os

from studio.cli import COMMANDS


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("batch", help=COMMANDS[__name__])
    parser.add_argument("jobs", help='JSONL file, one job per line: {"prompt": "a red star", "seed": 3, ...}')
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--device", default=None, help="override every job's device (default: the process's own)")
    parser.add_argument("--group", type=int, default=None, metavar="N",
                        help="one-image jobs that differ only in prompt, seed and <lora:...> tags run N at a time as "
                             "one batched call, each image with its own adapters (default 8; 1: one call per job)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch
    from accelerate import PartialState

    from studio.batch import GROUP, read_jobs, run_batch
    from studio.distributed import wait_for_everyone

    jobs = read_jobs(args.jobs)  # every process validates the whole file before any work starts
    cpu = (args.device or "").startswith("cpu") or os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true")
    state = PartialState(cpu=cpu or not torch.cuda.is_available())  # CPU processes meet over gloo
    device = args.device or (str(state.device) if state.distributed_type.value != "NO" else None)
    counts = run_batch(jobs, args.out, rank=state.process_index, world_size=state.num_processes, device=device,
                       group=GROUP if args.group is None else args.group)
    wait_for_everyone(state)
    print(json.dumps({"rank": state.process_index, **counts}))
    return 0
