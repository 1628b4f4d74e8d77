"""One job queue for long work (training): jobs run one at a time in a worker thread, in submission order.

A second request waits with the status `queued` instead of running beside the first. The page polls a job's
state (step, losses, previews, message); `cancel` stops a running job at its next step or drops a queued one.
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from studio.errors import StudioError


log = logging.getLogger(__name__)
FINISHED = ("done", "cancelled", "failed")


@dataclass
class Job:
    id: int
    label: str
    total: int  # steps, for "step k/N"
    work: Callable[[Job], tuple[str, str]]  # returns (final state "done" | "cancelled", message)
    key: str = ""  # what the job writes (an adapter name): two unfinished jobs never share one
    state: str = "queued"  # queued | running | done | cancelled | failed
    step: int = 0
    losses: list[tuple[int, float]] = field(default_factory=list)
    previews: list[Any] = field(default_factory=list)  # PIL images of the latest previews (info: prompt, seed)
    preview_step: int = 0
    preview_version: int = 0  # bumped when new previews or the comparison arrive (sent to the page only then)
    checkpoint_step: int | None = None  # step of the last checkpoint written
    comparison: list[tuple[Any, str]] = field(default_factory=list)  # after training: (image, caption), without/with
    phase: str = ""  # what a running job does besides stepping, e.g. "comparing with and without the adapter"
    message: str = ""
    cancel: threading.Event = field(default_factory=threading.Event)
    version: int = 0  # bumped on every change, so a poller can skip unchanged plots
    submitted: float = field(default_factory=time.time)
    started: float = 0.0
    first_step: int = 0  # the step this run started from (a resumed run starts at its checkpoint)
    first_step_time: float = 0.0  # when this run's first step was reported, and its latest one (for the pace)
    last_step_time: float = 0.0

    @property
    def finished(self) -> bool:
        return self.state in FINISHED

    def report_step(self, step: int, loss: float) -> None:
        """`trainers.Callbacks.on_step`."""
        now = time.time()
        if not self.losses:
            self.first_step, self.first_step_time = step - 1, now
        self.step, self.last_step_time = step, now
        self.losses.append((step, float(loss)))
        self.version += 1

    def report_previews(self, step: int, images: list[Any]) -> None:
        """`trainers.Callbacks.on_sample`."""
        self.previews, self.preview_step = list(images), step
        self.preview_version += 1
        self.version += 1

    def report_checkpoint(self, step: int) -> None:
        """`trainers.Callbacks.on_checkpoint`."""
        self.checkpoint_step = step
        self.version += 1

    def report_phase(self, phase: str) -> None:
        self.phase = phase
        self.version += 1

    def report_comparison(self, items: list[tuple[Any, str]]) -> None:
        self.comparison = list(items)
        self.preview_version += 1
        self.version += 1


def _clock(seconds: float) -> str:
    minutes, seconds = divmod(int(seconds), 60)
    return f"{minutes // 60}:{minutes % 60:02d}:{seconds:02d}" if minutes >= 60 else f"{minutes}:{seconds:02d}"


def _timing(job: Job) -> str:
    """`, 0:12 elapsed, about 1:30 left` from the pace of this run's steps so far (set-up before the first step, such
    as loading the model and rendering class images, is left out of the pace once two steps are done)."""
    elapsed = time.time() - job.started
    done = job.step - job.first_step
    if not job.losses or done <= 0:
        return f", {_clock(elapsed)} elapsed"
    pace = (job.last_step_time - job.first_step_time) / (done - 1) if done >= 2 else elapsed / done
    return f", {_clock(elapsed)} elapsed, about {_clock(pace * max(job.total - job.step, 0))} left"


class JobQueue:
    """Run submitted jobs one at a time, in order, in one daemon worker thread."""

    def __init__(self) -> None:
        self._jobs: dict[int, Job] = {}
        self._ids = itertools.count(1)
        self._pending: queue.Queue[Job] = queue.Queue()
        self._lock = threading.Lock()
        self._worker: threading.Thread | None = None

    def submit(self, label: str, total: int, work: Callable[[Job], tuple[str, str]], key: str = "") -> Job:
        with self._lock:
            self.check_free(key)
            job = Job(next(self._ids), label, total, work, key)
            self._jobs[job.id] = job
            if self._worker is None:
                self._worker = threading.Thread(target=self._run, name="studio-jobs", daemon=True)
                self._worker.start()
        self._pending.put(job)
        return job

    def check_free(self, key: str) -> None:
        """Refuse a second unfinished job for the same `key` (it would overwrite the first one's files)."""
        if key and any(j.key == key for j in self.unfinished()):
            raise StudioError(f"a job for {key!r} is already queued or running; wait for it or pick another name")

    def get(self, job_id: int | None) -> Job | None:
        return self._jobs.get(job_id) if job_id is not None else None

    def jobs(self) -> list[Job]:
        return list(self._jobs.values())

    def unfinished(self) -> list[Job]:
        return [j for j in self.jobs() if not j.finished]

    def ahead(self, job: Job) -> int:
        """How many unfinished jobs were submitted before `job`."""
        return sum(1 for j in self.unfinished() if j.id < job.id)

    def cancel(self, job_id: int) -> Job | None:
        job = self.get(job_id)
        if job is None or job.finished:
            return job
        job.cancel.set()
        if job.state == "queued":
            job.state, job.message = "cancelled", "cancelled before it started"
            job.version += 1
        return job

    def status(self, job: Job) -> str:
        """One line for the page: `queued: ...`, `running: step k/N ...`, or the final message."""
        if job.state == "queued":
            return f"queued: {job.label} waits for {self.ahead(job)} job(s) ahead of it"
        if job.state == "running":
            loss = f", loss {job.losses[-1][1]:.4f}" if job.losses else ""
            stopping = " (stopping...)" if job.cancel.is_set() else ""
            if job.phase:
                return f"running: {job.label}, {job.phase}{stopping}"
            return f"running: {job.label}, step {job.step}/{job.total}{loss}{_timing(job)}{stopping}"
        return f"{job.state}: {job.message}"

    def wait(self, job: Job, timeout: float | None = None) -> bool:
        """Block until `job` finishes (for scripts and tests); False on timeout."""
        deadline = None if timeout is None else time.time() + timeout
        while not job.finished:
            if deadline is not None and time.time() > deadline:
                return False
            time.sleep(0.05)
        return True

    def _run(self) -> None:
        while True:
            job = self._pending.get()
            if job.finished:  # cancelled while queued
                continue
            job.state, job.started = "running", time.time()
            job.version += 1
            try:
                job.state, job.message = job.work(job)
            except StudioError as err:
                job.state, job.message = "failed", str(err)
            except Exception as err:  # keep the worker alive for the next job; the page shows the failure
                log.exception("job %s failed", job.label)
                job.state, job.message = "failed", f"{type(err).__name__}: {err}"
            job.version += 1
