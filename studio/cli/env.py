"""`studio env`: versions, devices and paths, for bug reports."""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys

from studio.cli import COMMANDS


PACKAGES = ["torch", "torchvision", "diffusers", "transformers", "peft", "accelerate", "safetensors", "gradio",
            "open_clip_torch", "pillow", "triton"]


def report() -> dict[str, object]:
    from importlib.metadata import PackageNotFoundError, version

    import torch

    from studio.models import embedded_model_dir
    from studio.paths import PROJECT_ROOT, library_dir

    versions = {}
    for name in ["lora-studio", *PACKAGES]:
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            versions[name] = None
    devices = ["cpu"]
    if torch.cuda.is_available():
        devices += [f"cuda:{i} {torch.cuda.get_device_name(i)}" for i in range(torch.cuda.device_count())]
    return {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpu_threads": torch.get_num_threads(),
        "devices": devices,
        "cuda": torch.version.cuda,
        "versions": versions,
        "project": str(PROJECT_ROOT),
        "embedded_model": str(embedded_model_dir()),
        "embedded_model_built": (embedded_model_dir() / "model_index.json").is_file(),
        "library": str(library_dir().resolve()),
        "hf_hub_offline": os.environ.get("HF_HUB_OFFLINE", "0"),
    }


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("env", help=COMMANDS[__name__])
    parser.add_argument("--json", action="store_true", help="print JSON")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    info = report()
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    for key, value in info.items():
        if isinstance(value, dict):
            for name, ver in value.items():
                print(f"{name + ':':<22}{ver or 'not installed'}")
        else:
            print(f"{key + ':':<22}{value if not isinstance(value, list) else ', '.join(value)}")
    return 0
