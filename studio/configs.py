"""Config dataclasses from plain mappings: the one schema behind CLI flags, UI forms and JSON job lines.

A field `num_images: int = 1` is `--num-images` on the command line (studio/cli/options.py) and `num_images` or
`num-images` in a JSON job line or a UI form; `from_mapping` builds the dataclass from either spelling.

Numbers are checked where every path meets, in each config's `__post_init__` (`check_numbers`): NaN and infinity
are refused with the option's flag name (`float("nan") > 1` is False, so a NaN would otherwise slip past every
range check and silently change what a run does), whole-number fields refuse fractions, and a number written as
text in a JSON job (`"steps": "20"`) is read as the number.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
import types
import typing
from collections.abc import Callable
from typing import Any, TypeVar

from studio.errors import StudioError


T = TypeVar("T")


def base_type(annotation: Any) -> Any:
    """`int` for `int | None`; any other annotation unchanged."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) in (typing.Union, types.UnionType) and len(args) == 1:
        return args[0]
    return annotation


def flag(name: str) -> str:
    """The CLI flag of a field: `num_images` -> `--num-images`."""
    return "--" + name.replace("_", "-")


def finite(value: Any, option: str, kind: type = float) -> Any:
    """`value` as a finite number of `kind` (int or float), or a StudioError naming `option` and what to give.

    Text is parsed (`"0.5"`); an int `kind` refuses fractions and takes `20.0` as 20; a float `kind` keeps ints as
    they are (7 stays 7 in the recorded parameters).
    """
    if isinstance(value, str):
        text = value.strip()
        try:
            value = int(text) if kind is int and text.lstrip("+-").isdigit() else float(text)
        except ValueError:
            raise StudioError(f"{option} must be a number, got {value!r}") from None
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise StudioError(f"{option} must be a number, got {value!r}")
    if not math.isfinite(value):
        raise StudioError(f"{option} must be a finite number (not nan or infinity), got {value}")
    if kind is int:
        if value != int(value):
            raise StudioError(f"{option} must be a whole number, got {value!r}")
        return int(value)
    return value


def finite_type(option: str, kind: type = float) -> Callable[[str], Any]:
    """An argparse `type=` for a number flag that is not a config field: `finite_type("--lr")`."""
    return functools.partial(finite, option=option, kind=kind)


@functools.cache
def _numeric_fields(cls: type) -> tuple[tuple[str, type], ...]:
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        kind = base_type(hints[f.name])
        if kind in (int, float):
            out.append((f.name, kind))
    return tuple(out)


def check_numbers(config: Any) -> None:
    """Check every int / float field of a config dataclass in place (see the module docstring); None is left as is.

    Called first in each config's `__post_init__`, so the range checks after it only ever see finite numbers.
    """
    for name, kind in _numeric_fields(type(config)):
        value = getattr(config, name)
        if value is not None:
            setattr(config, name, finite(value, flag(name), kind))


def from_mapping(cls: type[T], values: dict[str, Any]) -> T:
    """Build `cls` from a dict whose keys are field names or flag names (dashes or underscores)."""
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in values.items():
        name = key.lstrip("-").replace("-", "_")
        if name not in names:
            raise StudioError(f"unknown option {key!r}; valid options: {', '.join(sorted(names))}")
        kwargs[name] = value
    try:
        return cls(**kwargs)
    except TypeError as err:
        raise StudioError(f"incomplete options: {err}") from err
