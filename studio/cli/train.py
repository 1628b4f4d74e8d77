"""`studio train`: train an adapter and add it to the library (DESIGN.md section 8).

Flags come from `trainers.TrainConfig` and from every method's config (its own options, e.g. `--alpha`, `--factor`;
a flag of another method is refused). Ctrl-C stops at the next micro-step and leaves a checkpoint that
`--resume latest` continues; a second Ctrl-C aborts at once.
"""

from __future__ import annotations

import argparse
import dataclasses
import signal
import threading
import typing

from studio.cli import COMMANDS


def register(subparsers: argparse._SubParsersAction) -> None:
    from studio.cli.options import add_dataclass_arguments
    from studio.configs import base_type, finite_type
    from trainers import METHODS, TrainConfig

    parser = subparsers.add_parser(
        "train",
        help=COMMANDS[__name__],
        description="Train an adapter on images or a Shapes World concept and add it to the library.",
    )
    parser.add_argument("--method", required=True, choices=list(METHODS), help="adapter method")
    add_dataclass_arguments(parser, TrainConfig, required=("trigger", "name"))
    common = {f.name for f in dataclasses.fields(TrainConfig)}
    group = parser.add_argument_group("method options (default: the method's paper values)")
    seen: dict[str, list[str]] = {}
    for key, cls in METHODS.items():
        for field in dataclasses.fields(cls.config_cls):
            if field.name not in common:
                seen.setdefault(field.name, []).append(key)
    for name, owners in seen.items():
        cls = next(METHODS[k].config_cls for k in owners)
        field = next(f for f in dataclasses.fields(cls) if f.name == name)
        kind = base_type(typing.get_type_hints(cls)[name])
        help_text = f"{field.metadata.get('help', '')} [{', '.join(owners)}]"
        flag = "--" + name.replace("_", "-")
        if kind is bool:
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        else:
            kind = finite_type(flag, kind) if kind in (int, float) else kind
            group.add_argument(flag, type=kind, default=None, metavar=name.upper(), help=help_text)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from trainers import configs_from_mapping, train

    values = {k: v for k, v in vars(args).items() if k not in ("func", "command")}
    method, config = configs_from_mapping(values)
    cancel = threading.Event()

    def stop(_signum: int, _frame: object) -> None:
        print("\nstopping at the next step (Ctrl-C again aborts)...", flush=True)
        cancel.set()
        signal.signal(signal.SIGINT, signal.default_int_handler)

    previous = signal.signal(signal.SIGINT, stop) if threading.current_thread() is threading.main_thread() else None
    try:
        result = train(method, config, cancel=cancel)
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)
    if result.status != "done":
        print(
            f"stopped at step {result.step} of {config.train_steps}; the run is in {result.run_dir}. Continue it "
            f"with: studio train <the same flags> --resume latest"
        )
        return 1
    for entry in result.entries:  # under `accelerate launch`, the main process alone writes the library
        print(f"added {entry.name!r} to the library ({entry.folder}); final loss {result.losses[-1]:.4f}")
    return 0
