"""Form inputs made from config dataclass fields (their type, default, help and choices), as the CLI makes flags.

So the page, `studio train --help` and JSON jobs share one schema: `field_input(TrainConfig, "train_steps")` is a
number box labelled "train steps" whose default and hint are the dataclass's. `form_values` turns the submitted
values back into options (empty optional boxes are left out, so the config's default applies).
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Any

import gradio as gr

from studio.configs import base_type, finite
from studio.errors import StudioError


TRISTATE = {"default": None, "on": True, "off": False}


def _field(cls: type, name: str) -> dataclasses.Field:
    for f in dataclasses.fields(cls):
        if f.name == name:
            return f
    raise KeyError(f"{cls.__name__} has no field {name!r}")


def field_input(cls: type, name: str, **overrides: Any) -> gr.components.Component:
    """A Gradio input for `cls.name`: Checkbox, Dropdown (choices, or default/on/off), Number (int, float), Textbox."""
    f = _field(cls, name)
    kind = base_type(typing.get_type_hints(cls)[name])
    default = None if f.default is dataclasses.MISSING else f.default
    kwargs: dict[str, Any] = {
        "label": name.replace("_", " "),
        "info": f.metadata.get("help"),
        "value": default,
        "elem_id": f"{cls.__name__.lower()}-{name.replace('_', '-')}",
        **overrides,
    }
    if kind is bool and default is None:  # `--flag / --no-flag`, absent meaning "the default"
        return gr.Dropdown(list(TRISTATE), **{**kwargs, "value": "default"})
    if kind is bool:
        return gr.Checkbox(**kwargs)
    if "choices" in f.metadata:
        return gr.Dropdown(list(f.metadata["choices"]), **kwargs)
    if kind in (int, float) and kwargs["value"] is not None:
        return gr.Number(precision=0 if kind is int else None, **kwargs)
    # optional numbers too: an empty box means "the default" (a Number box would show and send 0)
    value = "" if kwargs["value"] is None else str(kwargs["value"])
    return gr.Textbox(**{"placeholder": "empty: the default", **kwargs, "value": value})


def form_values(cls: type, values: dict[str, Any]) -> dict[str, Any]:
    """Submitted values as options of `cls`: empty boxes dropped, numbers cast to the field's type."""
    hints = typing.get_type_hints(cls)
    out: dict[str, Any] = {}
    for name, value in values.items():
        required = _field(cls, name).default is dataclasses.MISSING
        if value is None or (value == "" and not required):
            continue
        kind = base_type(hints[name])
        if kind is bool and isinstance(value, str):
            if value not in TRISTATE:
                raise StudioError(f"{name.replace('_', ' ')} must be one of {', '.join(TRISTATE)}, got {value!r}")
            if TRISTATE[value] is not None:
                out[name] = TRISTATE[value]
            continue
        if kind in (int, float):
            value = finite(value, name.replace("_", " "), kind)  # NaN, infinity and fractions of counts refused
        out[name] = float(value) if kind is float else value
    return out
