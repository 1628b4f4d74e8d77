"""The job queue: one job at a time in submission order; a second request says queued; cancel; failures shown."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import pytest

from studio.errors import StudioError
from studio.ui.jobs import Job, JobQueue


def _until(condition: Callable[[], bool], timeout: float = 10) -> None:
    deadline = time.time() + timeout
    while not condition():
        assert time.time() < deadline, "timed out"
        time.sleep(0.01)


def _blocking(release: threading.Event, ran: list[str], name: str) -> object:
    def work(job: Job) -> tuple[str, str]:
        ran.append(name)
        release.wait(10)
        job.report_step(1, 0.5)
        return "done", f"{name} finished"

    return work


def test_a_second_job_waits_queued_until_the_first_is_done() -> None:
    jobs, release, ran = JobQueue(), threading.Event(), []
    first = jobs.submit("first", 1, _blocking(release, ran, "first"), key="a")
    second = jobs.submit("second", 1, _blocking(release, ran, "second"), key="b")
    _until(lambda: first.state == "running")
    assert jobs.status(first).startswith("running: first, step 0/1, 0:00 elapsed")
    assert jobs.status(second) == "queued: second waits for 1 job(s) ahead of it"
    assert ran == ["first"]
    release.set()
    assert jobs.wait(second, timeout=10)
    assert ran == ["first", "second"] and [j.state for j in jobs.jobs()] == ["done", "done"]
    assert jobs.status(second) == "done: second finished" and second.losses == [(1, 0.5)]


def test_two_unfinished_jobs_never_share_a_name() -> None:
    jobs, release = JobQueue(), threading.Event()
    jobs.submit("first", 1, _blocking(release, [], "first"), key="corgi")
    with pytest.raises(StudioError, match="a job for 'corgi' is already queued or running"):
        jobs.submit("again", 1, _blocking(release, [], "again"), key="corgi")
    release.set()


def test_cancel_drops_a_queued_job_and_signals_a_running_one() -> None:
    jobs, release, ran = JobQueue(), threading.Event(), []

    def cancellable(job: Job) -> tuple[str, str]:
        ran.append("running")
        job.cancel.wait(10)
        return "cancelled", "stopped at step 0"

    running = jobs.submit("running", 5, cancellable)
    queued = jobs.submit("queued", 5, _blocking(release, ran, "queued"))
    jobs.cancel(queued.id)
    assert queued.state == "cancelled"
    _until(lambda: running.state == "running")
    jobs.cancel(running.id)
    assert jobs.wait(running, timeout=10) and running.state == "cancelled"
    later = jobs.submit("later", 1, lambda job: ("done", "ok"))
    assert jobs.wait(later, timeout=10) and ran == ["running"]  # the cancelled queued job never ran


def test_a_failing_job_shows_its_error_and_the_queue_goes_on() -> None:
    jobs = JobQueue()

    def fails(job: Job) -> tuple[str, str]:
        raise StudioError("--images /x: no such folder")

    def crashes(job: Job) -> tuple[str, str]:
        raise RuntimeError("boom")

    bad, worse = jobs.submit("bad", 1, fails), jobs.submit("worse", 1, crashes)
    good = jobs.submit("good", 1, lambda job: ("done", "ok"))
    assert jobs.wait(good, timeout=10)
    assert jobs.status(bad) == "failed: --images /x: no such folder"
    assert jobs.status(worse) == "failed: RuntimeError: boom" and good.state == "done"


def test_a_running_job_reports_loss_and_time_left() -> None:
    job = Job(1, "corgi (dreambooth_lora)", 10, lambda job: ("done", ""), state="running", started=time.time() - 30)
    job.report_step(5, 0.25)  # a resumed run: its first reported step is 5, so 1 step took 30 s
    assert (
        JobQueue().status(job) == "running: corgi (dreambooth_lora), step 5/10, loss 0.2500, 0:30 elapsed, "
        "about 2:30 left"
    )


def test_time_left_follows_the_pace_of_the_steps_not_the_set_up(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = [1000.0]
    monkeypatch.setattr(time, "time", lambda: clock[0])
    job = Job(1, "corgi (dreambooth_lora)", 10, lambda job: ("done", ""), state="running", started=1000.0)
    clock[0] = 1060.0  # a minute loading the model and rendering class images
    job.report_step(1, 0.5)
    clock[0] = 1062.0
    job.report_step(2, 0.4)  # then 2 s a step: 8 steps left take 16 s
    assert JobQueue().status(job).endswith("step 2/10, loss 0.4000, 1:02 elapsed, about 0:16 left")
    job.report_phase("rendering the side-by-side")
    assert JobQueue().status(job) == "running: corgi (dreambooth_lora), rendering the side-by-side"
