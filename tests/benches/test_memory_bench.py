"""`studio bench memory`: the generation memory estimate against the peak a fresh process measures, and the refusal."""

from __future__ import annotations

import json

import pytest

from studio.cli import main


@pytest.mark.heavy
def test_memory_bench_measures_under_the_estimate_and_times_the_refusal(tiny_dirs: dict, capsys) -> None:
    code = main(["bench", "memory", "--models", str(tiny_dirs["sd1"]), "--sizes", "128x128", "--steps", "1",
                 "--threads", "1"])
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    cases = report["cases"]
    assert [c["vae_tiling"] for c in cases] == [False, True] and all(c["size"] == "128x128" for c in cases)
    for case in cases:  # each in its own process: the estimate is an upper bound of the measured peak
        assert 0 < case["measured_mb"] <= case["estimated_mb"]
        assert abs(case["measured_over_estimated"] - case["measured_mb"] / case["estimated_mb"]) < 0.01
    assert report["ratio_max"] <= 1
    refusal = report["refusal"]
    assert refusal["exit_status"] == 2 and "lower --size or --num-images" in refusal["message"]
