"""`studio bench kill-resume` at a tiny size: a kill at a moment, one inside a checkpoint write and one before its
rename, each resumed to bit-identical weights (the bench's full run adds kills inside the library write)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest


@pytest.mark.heavy
def test_kill_resume_bench_resumes_every_kill_to_the_same_weights(tiny_dirs: dict) -> None:
    # A process of its own: the bench forks, and a pytest worker may hold a CUDA context from an earlier test.
    done = subprocess.run([sys.executable, "-m", "studio", "bench", "kill-resume", "--model", str(tiny_dirs["sd1"]),
                           "--steps", "2", "--kills", "3", "--threads", "1", "--seed", "1"],
                          capture_output=True, text=True, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout)
    assert report["by_kind"] == {"time": 1, "mid-write": 1, "pre-rename": 1, "library": 0}
    assert all(p["same_weights"] and p["temporaries_after_resume"] == 0 for p in report["points"])
    killed = [p for p in report["points"] if p["kind"] != "time"]
    assert all(p["exit"] == -signal.SIGKILL for p in killed)  # each died inside its write
    assert all(p["temporaries_after_kill"] == 1 for p in killed)  # and left its temporary, which the resume removed
