"""`studio` command line: one subcommand per module, each exposing `register(subparsers)`.

Every command module registers a parser whose `func` default takes the parsed args and returns an exit code.
User-facing problems raise `StudioError`: printed as one line, exit status 2, no traceback.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from studio.errors import StudioError


# Before torch loads OpenMP: its threads sleep at a barrier instead of spinning. On cores that other work shares,
# spinning threads wait on each other's time slices: 10-step images on studio-tiny at 2 threads took 11.5 s each
# with the default policy and 0.40-0.48 s with PASSIVE (1 thread: 0.36-0.38 s), load 4.5-5 on 2 cores.
# `OMP_WAIT_POLICY=ACTIVE studio ...` restores spinning. The cost on FREE cores: a DreamBooth-LoRA training step at
# 2 threads took 0.46 s with PASSIVE against 0.20 s spinning (1 thread: 0.25 s either way, alone or beside a second
# training; two 2-thread trainings at once: 0.42 s each with PASSIVE, 0.66 s and 17 s stalls spinning, 1.16 s at
# GOMP_SPINCOUNT=10000). A 20-step image with guidance, alone: 1.55 s PASSIVE, 0.65 s spinning, 0.87 s at 1 thread.
# So at --threads 2 on free cores, training runs 2.3x and generation 2.4x slower than they could (2026-12-05).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


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
