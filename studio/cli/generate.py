"""`studio generate`: text to image, PNGs with their parameters, a grid for several images."""

from __future__ import annotations

import argparse

from studio.cli.options import add_dataclass_arguments, from_namespace


def register(subparsers: argparse._SubParsersAction) -> None:
    from studio.generate import GenerateConfig

    parser = subparsers.add_parser("generate", help="generate images from a prompt")
    add_dataclass_arguments(parser, GenerateConfig, required=("prompt",))
    parser.add_argument("--out", required=True, help="output FILE.png (several images: FILE-000.png... + grid)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from studio.generate import GenerateConfig, cached_pipeline, generate, make_grid, output_paths, resolve_device
    from studio.pnginfo import save_png

    config = from_namespace(GenerateConfig, args)
    paths, grid_path = output_paths(args.out, config.num_images)
    cached_pipeline(config.model, resolve_device(config.device))  # load (and fail) before the progress bar
    with tqdm(total=config.steps, desc="generate", unit="step") as bar:
        result = generate(config, progress=lambda step, total: bar.update(step - bar.n))
    for image, params, path in zip(result.images, result.params, paths):
        save_png(image, path, params)
        print(path)
    if grid_path is not None:
        save_png(make_grid(result.images), grid_path, {**result.params[0], "num_images": config.num_images})
        print(grid_path)
    return 0
