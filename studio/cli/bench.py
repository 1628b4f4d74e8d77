"""`studio bench NAME`: quality and speed measurements that are too long for the test suite.

Each benchmark lives beside the code it measures and exposes `register_bench(subparsers)`; this module collects
them under one `bench` command.
"""

from __future__ import annotations

import argparse
import importlib


BENCHES = [
    "studio.world.bench",
    "studio.world.base_bench",
    "studio.generate_bench",
    "trainers.bench",
    "trainers.quality_bench",
    "composers.bench",
]


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("bench", help="quality and speed benchmarks")
    benches = parser.add_subparsers(dest="bench", metavar="NAME")
    for name in BENCHES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as err:
            if err.name != name:
                raise
            continue
        module.register_bench(benches)
    parser.set_defaults(func=lambda args: parser.print_help() or 2)
