"""`studio bench NAME`: quality and speed measurements that are too long for the test suite (see `benches/`)."""

from __future__ import annotations

import argparse

from studio.cli import COMMANDS


def register(subparsers: argparse._SubParsersAction) -> None:
    from benches import register_benches

    parser = subparsers.add_parser("bench", help=COMMANDS[__name__])
    register_benches(parser.add_subparsers(dest="bench", metavar="NAME"))
    parser.set_defaults(func=lambda args: parser.print_help() or 2)
