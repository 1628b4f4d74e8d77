"""Work that a page can cancel: a Gradio handler that is a generator over a worker thread.

Gradio cancels an event (the page's Stop button, `cancels=[...]`, or a client's `/cancel`) by dropping the task and
closing the event's iterator; a plain function running in Gradio's thread pool would go on to the end. So a handler
runs its work in a thread with a `cancel` event and yields `gr.skip()` updates while it waits: when Gradio closes the
generator, `cancel` is set and the work (which checks it after every denoising step) stops.

Every piece of work holds `PIPELINE_LOCK`: the cached pipelines are shared, and a cancelled worker may still be in
its last step when the queue starts the next request.
"""

from __future__ import annotations

import contextvars
import threading
from collections.abc import Callable, Iterator
from typing import Any, TypeVar


T = TypeVar("T")
PIPELINE_LOCK = threading.Lock()
POLL_S = 0.25


def cancellable(work: Callable[[threading.Event], T], waiting: Any, poll: float = POLL_S) -> Iterator[Any]:
    """Yield `waiting` every `poll` seconds while `work(cancel)` runs in a thread, then its result (or raise its
    error). Closing the generator (Gradio's cancel) sets `cancel`; the thread stops at its next check."""
    cancel = threading.Event()
    box: dict[str, Any] = {}

    def target() -> None:
        with PIPELINE_LOCK:
            try:
                if not cancel.is_set():
                    box["result"] = work(cancel)
            except BaseException as err:  # handed to the generator, which raises it in Gradio's thread
                box["error"] = err

    context = contextvars.copy_context()  # gr.Progress finds its event through context variables
    thread = threading.Thread(target=context.run, args=(target,), name="studio-ui-work", daemon=True)
    thread.start()
    try:
        while thread.is_alive():
            thread.join(poll)
            if thread.is_alive():
                yield waiting
    finally:
        cancel.set()  # a no-op when the work is done; on close (cancel) the work stops at its next step
    if "error" in box:
        raise box["error"]
    yield box["result"]
