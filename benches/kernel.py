"""`studio bench kernel`: the fused adapter projection beside merged weights and unfused PEFT layers.

The measurement itself lives with the kernel (`python -m lora_kernels.bench`), which imports nothing of the project;
this module gives it its place among the studio's benches.
"""

from __future__ import annotations

import argparse


def register_bench(benches: argparse._SubParsersAction) -> None:
    parser = benches.add_parser("kernel", help="fused multi-adapter q/k/v projection vs merged weights and PEFT")
    parser.add_argument("--out", default="bench-out/kernel", help="folder for kernel_bench.json and kernel_bench.md")
    parser.add_argument("--quick", action="store_true", help="two shapes; on the CPU also 1/16 of the tokens")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from lora_kernels.bench import main

    main(["--out", str(args.out), *(["--quick"] if args.quick else [])])
    return 0
