"""Kernel tests: the repository root on sys.path (so `lora_kernels` imports without an install, as on a bare GPU
machine), one torch thread, float64 where exact."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest


ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


@pytest.fixture(autouse=True)
def _one_thread(one_thread: None) -> None:
    pass
