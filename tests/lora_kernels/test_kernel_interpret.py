"""The Triton kernels themselves, on a CPU: triton's interpreter (TRITON_INTERPRET=1) in a child process.

The interpreter runs the same @triton.jit code with numpy, so this checks indexing, masks, the packed-projection rank
ranges, the per-token scale gather, dtypes and the autograd.Function, though not GPU speed or compilation.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest


pytest.importorskip("triton")
HERE = Path(__file__).resolve().parent
TOLERANCE = {"fp32": 1e-5, "fp16": 2e-3, "bf16": 2e-2, "grad": 1e-5}


@pytest.fixture(scope="module")
def errors() -> dict:
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": f"{HERE.parents[1]}{os.pathsep}{HERE}"}
    cmd = [sys.executable, str(HERE / "interpret_check.py")]
    done = subprocess.run(cmd, cwd=HERE.parents[1], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_interpreted_kernels_match_the_float64_reference(errors: dict) -> None:
    assert len(errors) == 21, sorted(errors)
    assert errors.pop("auto_backend_on_cpu") == "triton"  # the interpreter counts as a device for "auto"
    assert errors.pop("norm_auto_backend_on_cpu") == "triton"
    bad = {}
    for name, err in errors.items():
        if isinstance(err, str) or not err <= TOLERANCE[name.split("_")[0]]:
            bad[name] = err
    assert not bad, bad
