"""`studio bench generate`: seconds per image after a warm-up, and the cost of starting a process."""

from __future__ import annotations

import json

from studio.cli import main


def test_generate_bench_reports_the_median_of_its_runs_and_the_process_start(tiny_dirs: dict, capsys) -> None:
    code = main(["bench", "generate", "--model", str(tiny_dirs["sd1"]), "--steps", "1", "--runs", "3",
                 "--size", "32x32"])
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    assert report["runs"] == 3 and report["steps"] == 1 and report["size"] == "32x32" and report["threads"] >= 1
    assert 0 < report["min_s"] <= report["median_s_per_image"] <= report["max_s"]
    start = report["process_start_s"]
    assert 0 < start["imports_and_load"] < start["whole_process"]  # the interpreter's own start on top
