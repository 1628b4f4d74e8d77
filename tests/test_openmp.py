"""The CLI's OpenMP wait policy: OpenMP's own on free cores, PASSIVE where other work holds them, a user's kept."""

from __future__ import annotations

import os
import subprocess
import sys

from studio.openmp import BUSY_LOAD, choose_wait_policy, wait_policy


def test_busy_cores_sleep_free_cores_keep_openmps_default() -> None:
    assert wait_policy(0.0) is None and wait_policy(BUSY_LOAD - 0.01) is None
    assert wait_policy(BUSY_LOAD) == "PASSIVE" and wait_policy(4.5) == "PASSIVE"
    assert wait_policy(None) == "PASSIVE"  # an unreadable load average: never stall
    environ: dict[str, str] = {}
    assert choose_wait_policy(environ, load=0.1) == "default" and environ == {}
    assert choose_wait_policy(environ, load=2.0) == "PASSIVE" and environ == {"OMP_WAIT_POLICY": "PASSIVE"}
    given = {"OMP_WAIT_POLICY": "ACTIVE"}
    assert choose_wait_policy(given, load=5.0) == "ACTIVE" and given == {"OMP_WAIT_POLICY": "ACTIVE"}


def test_the_cli_sets_the_policy_before_torch_and_keeps_a_users() -> None:
    code = ("import os; load = os.getloadavg()[0]; import studio.cli, sys; "
            "print(os.environ.get('OMP_WAIT_POLICY', 'unset'), load, 'torch' in sys.modules)")
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    policy, load, torch_loaded = out.stdout.split()
    assert torch_loaded == "False"  # importing the CLI leaves torch (and its OpenMP) for later
    if float(load) >= BUSY_LOAD + 0.2:  # clearly busy (the load average moves between the two reads)
        assert policy == "PASSIVE"
    elif float(load) < BUSY_LOAD - 0.2:
        assert policy == "unset"
    out = subprocess.run([sys.executable, "-c", code], env={**env, "OMP_WAIT_POLICY": "ACTIVE"},
                         capture_output=True, text=True, check=True)
    assert out.stdout.split()[0] == "ACTIVE"
