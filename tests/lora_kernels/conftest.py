"""Kernel tests: the repository's `kernels` package first on sys.path, one torch thread, float64 where exact."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest


ROOT = Path(__file__).resolve().parents[2]
# Hugging Face's `kernels` (a transformers requirement) has the same top-level name; ours must be the one imported.
if sys.path[0] != str(ROOT):
    sys.path.insert(0, str(ROOT))
_loaded = sys.modules.get("kernels")
if _loaded is not None and not str(getattr(_loaded, "__file__", "")).startswith(str(ROOT)):
    for name in [m for m in sys.modules if m == "kernels" or m.startswith("kernels.")]:
        del sys.modules[name]


@pytest.fixture(autouse=True)
def _one_thread(one_thread: None) -> None:
    pass
