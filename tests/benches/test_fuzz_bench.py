"""`studio bench fuzz` at a tiny size: each mutant is imported whole or refused cleanly; the library stays clean."""

from __future__ import annotations

import json

from studio.cli import main


def test_fuzz_bench_imports_or_refuses_every_mutant(tiny_dirs: dict, capsys) -> None:
    code = main(["bench", "fuzz", "--model", str(tiny_dirs["sd1"]), "--per-format", "6", "--seed", "3",
                 "--lora-targets", "to_q,proj_in,conv1"])  # fewer layers: the same paths, quicker loads
    report = json.loads(capsys.readouterr().out)
    assert code == 0, report["bugs"]
    assert report["total"]["mutants"] == 24
    assert report["total"]["imported"] + report["total"]["refused"] == 24
    assert report["total"]["imported"] and report["total"]["refused"]  # both paths ran, with their checks
    assert report["library_after"] == {"entries": 0, "hidden_leftovers": []}
