"""`studio info FILE.png`: the generation parameters stored in a PNG."""

from __future__ import annotations

import argparse
import json

from studio.cli import COMMANDS


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("info", help=COMMANDS[__name__])
    parser.add_argument("file", help="a PNG written by the studio (or A1111)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of A1111 text")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from studio.pnginfo import a1111_text, read_parameters

    params = read_parameters(args.file)
    if args.json:
        print(json.dumps(params, indent=2, sort_keys=True))
    elif "Steps" in params:  # A1111's own text, parsed: print it as A1111 wrote it
        print(json.dumps(params, indent=2))
    else:
        print(a1111_text(params))
    return 0
