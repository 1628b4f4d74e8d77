"""Composer tests run on one thread (the machine is shared) with tiny pipelines and random adapters."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _one_thread(one_thread: None) -> None:
    pass
