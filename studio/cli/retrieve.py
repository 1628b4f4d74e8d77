"""`studio retrieve "PROMPT" [--k 3] [--weights-only]`: library adapters ranked by how well they match a prompt.

AutoLoRA retrieval (`studio.library.retrieval`): the weight encoder's score, plus the metadata's unless
`--weights-only`. `--train` first trains the retriever on the library (kept in `$STUDIO_LIBRARY/.retrieval/`).
"""

from __future__ import annotations

import argparse
import json

from studio.cli import COMMANDS


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("retrieve", help=COMMANDS[__name__])
    parser.add_argument("prompt", nargs="?", help="what you want, in words, e.g. 'a yellow star inside a purple ring'")
    parser.add_argument("--k", type=int, default=3, help="how many adapters to list (default 3)")
    parser.add_argument("--weights-only", action="store_true", help="rank by the adapters' weights alone (no card, "
                        "trigger or tags)")
    parser.add_argument("--train", action="store_true", help="train the retriever on the library first")
    parser.add_argument("--train-steps", type=int, default=None, help="retriever training steps (default 1000)")
    parser.add_argument("--exclude", default="",
                        help="with --train: adapters left out of training (comma-separated)")
    parser.add_argument("--json", action="store_true", help="print JSON")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from studio.errors import StudioError
    from studio.library.retrieval import RetrieverConfig, retrieve, train_retriever

    if not args.train and not args.prompt:
        raise StudioError('give a prompt (studio retrieve "a yellow star inside a purple ring") or --train')
    if args.train:
        config = RetrieverConfig() if args.train_steps is None else RetrieverConfig(steps=args.train_steps)
        if config.steps < 1:
            raise StudioError(f"--train-steps must be at least 1, got {config.steps}")
        info = train_retriever(config=config, exclude=[n for n in args.exclude.split(",") if n.strip()])
        print(f"retriever trained on {len(info['trained_on'])} adapters in {info['seconds']} s "
              f"(final loss {info['final_loss']:.3f})")
    if not args.prompt:
        return 0
    found = retrieve(args.prompt, args.k, weights_only=args.weights_only)
    if args.json:
        print(json.dumps([asdict(r) for r in found], indent=2))
        return 0
    for rank, r in enumerate(found, 1):
        parts = [f"weights {r.weights:.3f}" if r.weights is not None else "",
                 f"metadata {r.metadata:.3f}" if r.metadata is not None else ""]
        new = "  [new to the retriever]" if r.learned is False else ""
        print(f"{rank}. {r.name}  score {r.score:.3f}  ({', '.join(p for p in parts if p)}){new}")
    if any(r.learned is False for r in found):
        print("adapters new to the retriever are read poorly from their weights alone: "
              "`studio retrieve --train` learns them")
    return 0
