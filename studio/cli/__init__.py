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


# Literal and greppable: the order is the order of `studio --help`, and each line is the command's summary there
# (its module registers the same one: tests/test_cli.py), so `studio --help` lists them without importing any.
COMMANDS = {
    "studio.cli.generate": "generate images from a prompt",
    "studio.cli.compose": "generate with several adapters composed (merge, switch, ...)",
    "studio.cli.info": "print the parameters stored in a generated PNG",
    "studio.cli.env": "print versions, devices and paths for bug reports",
    "studio.cli.world": "Shapes World: render, evaluate, train its VAE and CLIP",
    "studio.cli.bench": "quality and speed benchmarks",
    "studio.cli.library": "the adapter library: list, import, export, merge, edit",
    "studio.cli.batch": "run a JSONL job file (one `studio generate` per line); resumable, shardable with accelerate",
    "studio.cli.train": "train an adapter (DreamBooth-LoRA, DiffuseKronA, ...)",
    "studio.cli.retrieve": "rank library adapters by a prompt (AutoLoRA retrieval)",
}


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The parser of the command `argv` names, or of every command's name and summary when it names none (`studio
    --help`, a typo): a command module imports what its flags need (`studio generate` the pipeline code), so `studio
    --help` and `studio library list` start without torch."""
    parser = argparse.ArgumentParser(prog="studio", description="LoRA Studio: train, keep and compose adapters.")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    first = next((a for a in argv or [] if not a.startswith("-")), None)
    chosen = [n for n in COMMANDS if n.rsplit(".", 1)[1] == first]
    if not chosen:  # names and summaries only; `studio COMMAND --help` gives a command's flags
        for name, summary in COMMANDS.items():
            subparsers.add_parser(name.rsplit(".", 1)[1], help=summary, add_help=False)
        return parser
    importlib.import_module(chosen[0]).register(subparsers)
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
