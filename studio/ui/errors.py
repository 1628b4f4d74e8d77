"""Every `StudioError` a handler raises is shown in the page as a `gr.Error` (the message says what to do)."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any, TypeVar

import gradio as gr

from studio.errors import StudioError


F = TypeVar("F", bound=Callable[..., Any])


def shows_errors(fn: F) -> F:
    """Wrap a Gradio handler (a function or a generator function) so that a StudioError becomes a gr.Error."""
    if inspect.isgeneratorfunction(fn):

        @functools.wraps(fn)
        def generator(*args: Any, **kwargs: Any) -> Any:
            try:
                yield from fn(*args, **kwargs)
            except StudioError as err:
                raise gr.Error(str(err)) from err

        return generator  # type: ignore[return-value]

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except StudioError as err:
            raise gr.Error(str(err)) from err

    return wrapper  # type: ignore[return-value]
