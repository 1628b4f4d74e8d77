"""`studio bench library` at a tiny size: times are reported, and killed writers never cost the library an entry."""

from __future__ import annotations

import json

from studio.cli import main


def test_library_bench_lists_searches_resolves_and_survives_killed_writers(tiny_dirs: dict, capsys) -> None:
    code = main(["bench", "library", "--model", str(tiny_dirs["sd1"]), "--adapters", "30", "--repeats", "1",
                 "--kills", "3", "--max-delay", "0.6", "--no-cli"])
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    timings, crashes = report["timings"], report["crash_between_writes"]
    assert report["fill"]["adds"] == 30 and timings["entries_listed"] == 30 and timings["search_hits"] > 0
    assert all(timings[k] > 0 for k in ("list_s", "search_text_s", "resolve_tag_s", "rebuild_index_s"))
    assert crashes["kills"] == 3 and crashes["index_rows_match"] == 3 and crashes["problems"] == 0
    assert crashes["entries_checked"] >= 3 * 5 and crashes["leftovers_after_reindex"] == 0
