"""OpenMP's wait policy, chosen before torch loads OpenMP: threads spin a while at barriers on free cores, sleep at
once on busy ones.

Measured on 2 cores (studio-tiny, 2 threads, medians; 2026-12-05):

| work | free cores, OpenMP's default | free cores, PASSIVE | 1 thread |
|---|---|---|---|
| DreamBooth-LoRA training step | 0.203 s | 0.459 s | 0.246 s |
| 20-step image with guidance | 0.65 s | 1.55 s | 0.87 s |

With a second training beside it, spinning threads wait on each other's time slices: 0.66 s a step with stalls of 17 s
(1.16 s at GOMP_SPINCOUNT=10000), against 0.42 s sleeping; 10-step images took 11.5 s each spinning at load 4.5-5
against 0.40-0.48 s sleeping. Neither policy wins both, so the CLI looks at what runs now: the kernel's count of
runnable threads (/proc/loadavg's fourth field), read 5 times 10 ms apart, its median less this process's own thread.
The 1-minute load average, the fallback where that count cannot be read, still holds processes that ended a minute ago:
100 DreamBooth-LoRA steps started while it read 1.2-1.7 from runs just ended took 22-26 s spinning, as the count
chooses, against 46-53 s sleeping, as the load average chose (`studio train`, 2 runs each, 2026-12-06); with another
training running beside it the count chose to sleep in 5 of 5 starts. The test suite always sleeps (its workers share
the cores); the web UI has its own rule, below. `OMP_WAIT_POLICY=ACTIVE` or `PASSIVE` in the environment is kept as
given.

The web UI runs a training and generations side by side in one process. There a short spin (`GOMP_SPINCOUNT=10000`)
beats sleeping, measured in one process as the UI runs them (DreamBooth-LoRA training thread, 20-step generations in a
second thread beside it from step 80; medians, 2 threads, 2026-12-06):

| | PASSIVE | GOMP_SPINCOUNT=10000 |
|---|---|---|
| training step alone | 0.409 s | 0.211 s |
| training step beside generations | 0.456 s | 0.491 s |
| generation beside training | 1.22 s | 1.39 s (max 1.93 s) |

So `choose_ui_policy` spins briefly where no other process runs, and sleeps where one does (between processes a
spin count of 10000 still stalled a step to 1.16 s).
"""

from __future__ import annotations

import os
from collections.abc import MutableMapping


BUSY_LOAD = 0.5  # the last minute's load average from which other work is taken to hold a core
UI_SPINCOUNT = "10000"  # the web UI's spin at a barrier on free cores (module docstring)
LOADAVG = "/proc/loadavg"  # "0.52 0.58 0.59 2/114 20259": the fourth field is runnable/all threads


def others_running(path: str | None = None, samples: int = 5, interval_s: float = 0.01) -> float | None:
    """Runnable threads of other processes now: the median of `samples` reads of the kernel's count, less this
    process's one thread (the CLI reads it before torch starts any other); None where it cannot be read."""
    import statistics
    import time

    counts = []
    for i in range(samples):
        try:
            with open(path or LOADAVG) as f:
                counts.append(int(f.read().split()[3].split("/")[0]))
        except (OSError, IndexError, ValueError):
            return None
        if i + 1 < samples:
            time.sleep(interval_s)
    return max(0.0, statistics.median(counts) - 1)


def wait_policy(load: float | None) -> str | None:
    """None (OpenMP's default: spin a while at a barrier, then sleep) when no other work holds a core (`load`: other
    processes' runnable threads, or the 1-minute load average), else PASSIVE (sleep at once). An unreadable load
    sleeps: slower on free cores, never stalled on busy ones."""
    return None if load is not None and load < BUSY_LOAD else "PASSIVE"


def choose_wait_policy(environ: MutableMapping[str, str] = os.environ, load: float | None = None) -> str:
    """Set OMP_WAIT_POLICY=PASSIVE in `environ` when the cores are busy (`load`, default the runnable threads of other
    processes now, else this machine's 1-minute load average) unless the policy is set already; returns the policy in
    force ("default": OpenMP's own). Call it before torch is imported. A spin count in `environ` (a user's, or the
    web UI's: `choose_ui_policy`, whose page imports the CLI's modules) is a choice made: it is kept as it is."""
    if "GOMP_SPINCOUNT" in environ and "OMP_WAIT_POLICY" not in environ:
        return f"GOMP_SPINCOUNT={environ['GOMP_SPINCOUNT']}"
    if "OMP_WAIT_POLICY" not in environ:
        if load is None:
            load = others_running()
        if load is None:
            try:
                load = os.getloadavg()[0]
            except OSError:
                load = None
        policy = wait_policy(load)
        if policy is None:
            return "default"
        environ["OMP_WAIT_POLICY"] = policy
    return environ["OMP_WAIT_POLICY"]


def choose_ui_policy(environ: MutableMapping[str, str] = os.environ, load: float | None = None) -> str:
    """The web UI's: `GOMP_SPINCOUNT=10000` (spin briefly, then sleep) where no other process holds a core (`load`, as
    `choose_wait_policy` reads it), else OMP_WAIT_POLICY=PASSIVE; a policy or spin count already in `environ` is kept.
    Returns what is in force. Call it before torch is imported."""
    if "OMP_WAIT_POLICY" in environ or "GOMP_SPINCOUNT" in environ:
        return environ.get("OMP_WAIT_POLICY") or f"GOMP_SPINCOUNT={environ['GOMP_SPINCOUNT']}"
    policy = choose_wait_policy(environ, load)
    if policy == "default":
        environ["GOMP_SPINCOUNT"] = UI_SPINCOUNT
        return f"GOMP_SPINCOUNT={UI_SPINCOUNT}"
    return policy
