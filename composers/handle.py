"""`Handle`: what installing a composer returns; `remove()` undoes every change, newest first, exactly once."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


class Handle:
    """Holds undo functions; `remove()` runs them in reverse order. Also a context manager."""

    def __init__(self, name: str, undo: list[Callable[[], None]] | None = None, state: Any = None) -> None:
        self.name = name
        self.state = state  # the composer's live state (e.g. the adapter active at each step), for inspection
        self._undo = list(undo or [])

    def add(self, undo: Callable[[], None]) -> None:
        self._undo.append(undo)

    @property
    def removed(self) -> bool:
        return not self._undo

    def remove(self) -> None:
        while self._undo:
            self._undo.pop()()

    def __enter__(self) -> Handle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def __repr__(self) -> str:
        return f"Handle({self.name!r}, {'removed' if self.removed else 'installed'})"
