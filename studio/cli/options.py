"""Flags from config dataclasses, so the CLI, the UI and JSON job files share one schema (studio/configs.py).

A field `num_images: int = 1` with `metadata={"help": ...}` becomes `--num-images N`; a JSON job line may use
`num-images` or `num_images` as its key. Fields with `metadata={"cli": False}` are not exposed.
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from typing import Any, TypeVar

from studio.configs import base_type, finite_type, from_mapping


T = TypeVar("T")


def add_dataclass_arguments(parser: argparse.ArgumentParser, cls: type, *, required: tuple[str, ...] = ()) -> None:
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        if not field.metadata.get("cli", True):
            continue
        flag = "--" + field.name.replace("_", "-")
        kind = base_type(hints[field.name])
        kwargs: dict[str, Any] = {"help": field.metadata.get("help", ""), "dest": field.name}
        if "choices" in field.metadata:
            kwargs["choices"] = field.metadata["choices"]
        if kind is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
            kwargs["default"] = field.default
        else:
            # numbers through `finite`: one-line errors naming the flag, NaN and infinity refused
            kwargs["type"] = finite_type(flag, kind) if kind in (int, float) else str
            kwargs["metavar"] = field.metadata.get("metavar", field.name.upper())
            if field.name in required:
                kwargs["required"] = True
            elif field.default is not dataclasses.MISSING:
                kwargs["default"] = field.default
            else:
                kwargs["default"] = None
        parser.add_argument(flag, **kwargs)


def from_namespace(cls: type[T], args: argparse.Namespace) -> T:
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in vars(args).items() if k in names})


__all__ = ["add_dataclass_arguments", "base_type", "from_mapping", "from_namespace"]
