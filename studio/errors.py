"""The one exception type the studio raises for user-facing problems.

A `StudioError` message is a single line that names the problem and says what to do. The CLI prints it without
a traceback and exits with status 2; the web UI shows it in the page.
"""

from __future__ import annotations


class StudioError(Exception):
    """A problem with the user's input or environment, with a message that says how to fix it."""


class DiskFull(StudioError):
    """A write ran out of disk space (ENOSPC / EDQUOT); what was there before is intact. `path`: the file."""

    def __init__(self, message: str, path: object = None) -> None:
        super().__init__(message)
        self.path = path


class Cancelled(StudioError):
    """Work stopped because the user asked (a cancel event was set); nothing it had finished is lost."""


class OutOfMemory(StudioError):
    """A generation does not fit the device's memory (refused before the work, or failed in it twice)."""
