"""`studio generate`: text to image, PNGs with their parameters, a grid for several images."""

from __future__ import annotations

import argparse

from studio.cli import COMMANDS
from studio.cli.options import add_dataclass_arguments, from_namespace


def register(subparsers: argparse._SubParsersAction) -> None:
    from studio.generate import GenerateConfig

    parser = subparsers.add_parser("generate", help=COMMANDS[__name__])
    add_dataclass_arguments(parser, GenerateConfig, required=("prompt",))
    parser.add_argument("--out", required=True, help="output FILE.png (several images: FILE-000.png... + grid)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from studio.generate import (
        GenerateConfig,
        cached_pipeline,
        generate,
        memory_plan,
        output_paths,
        resolve_device,
        save_result,
    )

    config = from_namespace(GenerateConfig, args)
    output_paths(args.out, config.num_images)  # a bad --out fails before any work
    pipe = cached_pipeline(config.model, resolve_device(config.device))  # load (and fail) before the progress bar
    memory_plan(config, pipe)  # a request that cannot fit in memory fails before the progress bar too
    with tqdm(total=config.steps, desc="generate", unit="step") as bar:
        result = generate(config, progress=lambda step, total: bar.update(step - bar.n))
    for path in save_result(result, args.out):
        print(path)
    return 0
