"""The CLI's OpenMP wait policy: OpenMP's own on free cores, PASSIVE where other work holds them, a user's kept."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from studio import openmp
from studio.openmp import BUSY_LOAD, choose_wait_policy, others_running, wait_policy


def test_busy_cores_sleep_free_cores_keep_openmps_default() -> None:
    assert wait_policy(0.0) is None and wait_policy(BUSY_LOAD - 0.01) is None
    assert wait_policy(BUSY_LOAD) == "PASSIVE" and wait_policy(4.5) == "PASSIVE"
    assert wait_policy(None) == "PASSIVE"  # an unreadable load average: never stall
    environ: dict[str, str] = {}
    assert choose_wait_policy(environ, load=0.1) == "default" and environ == {}
    assert choose_wait_policy(environ, load=2.0) == "PASSIVE" and environ == {"OMP_WAIT_POLICY": "PASSIVE"}
    given = {"OMP_WAIT_POLICY": "ACTIVE"}
    assert choose_wait_policy(given, load=5.0) == "ACTIVE" and given == {"OMP_WAIT_POLICY": "ACTIVE"}


def test_other_processes_runnable_threads_are_read_now(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The kernel's count of runnable threads, less this process's, as the median of its reads: a process that ended
    a minute ago (still in the load average) counts for nothing, a blip in one read of five neither."""
    loadavg = tmp_path / "loadavg"
    loadavg.write_text("3.10 1.20 0.80 1/114 20259\n")  # a minute of someone else's work, nothing runs now
    assert others_running(str(loadavg), interval_s=0) == 0 and wait_policy(0) is None
    loadavg.write_text("0.10 0.20 0.30 3/114 20259\n")  # two threads of another training run now
    assert others_running(str(loadavg), interval_s=0) == 2 and wait_policy(2) == "PASSIVE"
    assert others_running(str(tmp_path / "missing"), interval_s=0) is None  # then the load average decides
    loadavg.write_text("garbled\n")
    assert others_running(str(loadavg), interval_s=0) is None
    monkeypatch.setattr(openmp, "LOADAVG", str(loadavg))
    for text, policy in (("3.10 1.20 0.80 1/114 1\n", "default"), ("0.10 0.20 0.30 2/114 1\n", "PASSIVE")):
        loadavg.write_text(text)  # what runs now decides, not the last minute's average
        environ: dict[str, str] = {}
        assert choose_wait_policy(environ) == policy


def test_the_cli_sets_the_policy_before_torch_and_keeps_a_users() -> None:
    code = "import os, studio.cli, sys; print(os.environ.get('OMP_WAIT_POLICY', 'unset'), 'torch' in sys.modules)"
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    policy, torch_loaded = out.stdout.split()
    assert torch_loaded == "False"  # importing the CLI leaves torch (and its OpenMP) for later
    assert policy in ("unset", "PASSIVE")  # which one: what other workers of the suite run at that moment
    out = subprocess.run([sys.executable, "-c", code], env={**env, "OMP_WAIT_POLICY": "ACTIVE"},
                         capture_output=True, text=True, check=True)
    assert out.stdout.split()[0] == "ACTIVE"


def test_the_web_ui_spins_briefly_on_free_cores_and_sleeps_beside_other_processes() -> None:
    from studio.openmp import UI_SPINCOUNT, choose_ui_policy

    environ: dict[str, str] = {}
    assert choose_ui_policy(environ, load=0) == f"GOMP_SPINCOUNT={UI_SPINCOUNT}"
    assert environ == {"GOMP_SPINCOUNT": UI_SPINCOUNT}
    # the page imports the CLI's modules, whose own choice then keeps the UI's, whatever runs by then
    assert choose_wait_policy(environ, load=2) == f"GOMP_SPINCOUNT={UI_SPINCOUNT}"
    assert environ == {"GOMP_SPINCOUNT": UI_SPINCOUNT}
    environ = {}
    assert choose_ui_policy(environ, load=1) == "PASSIVE" and environ == {"OMP_WAIT_POLICY": "PASSIVE"}
    for given in ({"OMP_WAIT_POLICY": "ACTIVE"}, {"GOMP_SPINCOUNT": "300"}):  # a user's setting is kept
        assert choose_ui_policy(dict(given), load=0) in ("ACTIVE", "GOMP_SPINCOUNT=300")


def test_importing_app_sets_a_policy() -> None:
    code = "import os, app, sys; print(os.environ.get('GOMP_SPINCOUNT') or os.environ['OMP_WAIT_POLICY'], " \
           "'torch' in sys.modules)"
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=root, capture_output=True, text=True, check=True)
    policy, _ = out.stdout.split()
    assert policy in ("10000", "PASSIVE")  # which one: what other workers of the suite run at that moment
