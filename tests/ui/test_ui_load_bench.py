"""`studio bench ui-load` at a tiny size, against servers in this process: simultaneous requests all answered with
their own seeds, a running request stopped by a cancel, a queue limit refusing the surplus, an upload limit."""

from __future__ import annotations

import json
import os

import pytest

from benches.ui_load import Server, free_port, run
from studio.ui import build_app, launch


def _start(queue_size: int, max_upload_mb: float) -> Server:
    demo, port = build_app(), free_port()
    launch(demo, port=port, queue_size=queue_size, max_file_size=int(max_upload_mb * 2**20),
           prevent_thread_lock=True, quiet=True)
    return Server(f"http://127.0.0.1:{port}/", os.getpid(), demo.close)


@pytest.mark.heavy
def test_ui_load_bench_answers_every_request_cancels_and_limits(tiny_dirs: dict) -> None:
    report = run(str(tiny_dirs["sd1"]), 3, 2, "32x32", "64x64", 1, rounds=1, cancel_after_s=0.5, start=_start)
    assert report["ok"], json.dumps(report, default=str)  # whole: pytest shortens a dict's repr
    (load,) = report["rounds"]
    assert load["answered"] == 3 and load["max_queue_size"] >= 1  # the clients were told the queue's length
    cancel = report["cancel"]
    assert cancel["running_when_cancelled"] and cancel["long_request_outcome"] == "cancelled"
    assert not cancel["waiting_request_ran"]
    # stopped: the short request came back in about its own time and the server idled after it
    assert cancel["short_request_done_after_cancel_s"] < 2 * cancel["short_request_alone_s"] + 0.5
    assert cancel["server_cpu_s_in_the_0.7s_after"] < 0.35
    assert report["queue_limit"]["refused"] >= 1 and "Queue is full" in report["queue_limit"]["messages"][0]
    assert report["uploads"]["over_limit_status"] == 413 and "maximum allowed size" in report["uploads"][
        "over_limit_message"]
