"""`studio` command line: one subcommand per module, each exposing `register(subparsers)`.

Every command module registers a parser whose `func` default takes the parsed args and returns an exit code.
User-facing problems raise `StudioError`: printed as one line, exit status 2, no traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from studio.errors import StudioError
from studio.openmp import choose_wait_policy


# Before torch loads OpenMP: its threads spin at barriers on free cores and sleep where other work holds them
# (measurements in studio.openmp). `OMP_WAIT_POLICY=ACTIVE|PASSIVE studio ...` chooses.
choose_wait_policy()


# Literal and greppable: the order is the order of `studio --help`.
COMMANDS = [
    "studio.cli.generate",
    "studio.cli.compose",
    "studio.cli.info",
    "studio.cli.env",
    "studio.cli.world",
    "studio.cli.bench",
    "studio.cli.library",
    "studio.cli.batch",
    "studio.cli.train",
    "studio.cli.retrieve",
]


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The parser of every command, or only of the command `argv` names: a command module imports what its flags
    need (`studio generate` the pipeline code), so `studio library list` starts without torch."""
    parser = argparse.ArgumentParser(prog="studio", description="LoRA Studio: train, keep and compose adapters.")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    first = next((a for a in argv or [] if not a.startswith("-")), None)
    chosen = [n for n in COMMANDS if n.rsplit(".", 1)[1] == first]
    for name in chosen or COMMANDS:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as err:  # a command group not built yet
            if err.name != name:
                raise
            continue
        module.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser(sys.argv[1:] if argv is None else argv)
    try:
        args = parser.parse_args(argv)  # a flag's own check (e.g. a finite --lr) may raise a StudioError
        if not getattr(args, "func", None):
            parser.print_help()
            return 2
        return int(args.func(args) or 0)
    except StudioError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
