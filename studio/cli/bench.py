"""`studio bench NAME`: quality and speed measurements that are too long for the test suite (see `benches/`)."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    from benches import register_benches

    parser = subparsers.add_parser("bench", help="quality and speed benchmarks")
    register_benches(parser.add_subparsers(dest="bench", metavar="NAME"))
    parser.set_defaults(func=lambda args: parser.print_help() or 2)
