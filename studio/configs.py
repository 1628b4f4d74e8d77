"""Config dataclasses from plain mappings: the one schema behind CLI flags, UI forms and JSON job lines.

A field `num_images: int = 1` is `--num-images` on the command line (studio/cli/options.py) and `num_images` or
`num-images` in a JSON job line or a UI form; `from_mapping` builds the dataclass from either spelling.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, TypeVar

from studio.errors import StudioError


T = TypeVar("T")


def base_type(annotation: Any) -> Any:
    """`int` for `int | None`; any other annotation unchanged."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) in (typing.Union, types.UnionType) and len(args) == 1:
        return args[0]
    return annotation


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
