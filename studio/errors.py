"""The one exception type the studio raises for user-facing problems.

A `StudioError` message is a single line that names the problem and says what to do. The CLI prints it without
a traceback and exits with status 2; the web UI shows it in the page.
"""

from __future__ import annotations


class StudioError(Exception):
    """A problem with the user's input or environment, with a message that says how to fix it."""
