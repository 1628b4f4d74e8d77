"""Every `StudioError` a handler raises is shown in the page as a `gr.Error` (the message says what to do)."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar

import gradio as gr

from studio.errors import StudioError


F = TypeVar("F", bound=Callable[..., Any])


def shows_errors(fn: F) -> F:
    """Wrap a Gradio handler so that a StudioError becomes a gr.Error in the page."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except StudioError as err:
            raise gr.Error(str(err)) from err

    return wrapper  # type: ignore[return-value]
