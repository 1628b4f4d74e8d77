"""`studio bench report`: assembly over the registries, figures, the coverage check, part keys (reuse, re-run, resume)
and `--compare` on a planted regression; synthetic parts shaped as the benches write them (report_parts.py)."""

from __future__ import annotations

import copy
import json
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from report_parts import meta, parts, write_report

from benches.report import Unit, commit_id, part_key, run_unit, tree_id
from benches.report_compare import compare, margin_raw
from benches.report_plots import COLOURS
from benches.report_tables import assemble
from studio.errors import StudioError


def test_report_has_a_row_per_method_and_composer_and_draws_every_figure(tmp_path: Path) -> None:
    import composers
    from trainers import METHODS

    report = write_report(tmp_path)
    text = (tmp_path / "report.md").read_text()
    for method in METHODS:
        assert f"\n| {method} |" in text
    for name in composers.COMPOSERS:
        assert f"\n| {name} | two subjects |" in text
    assert "QUICK" in text and "60 training steps per adapter" in text  # the reductions are stated
    assert json.loads((tmp_path / "report.json").read_text())["trainers"][0]["raw"]["found"]  # raw judgements kept
    assert len(report["figures"]) == 8
    for name in report["figures"]:
        image = np.asarray(Image.open(tmp_path / name).convert("RGB"))
        assert image.shape[1] == 760 and image.shape[0] > 470
    # one marker colour per method on the scatter (legend and point), none of the unused ones
    scatter = np.asarray(Image.open(tmp_path / "trainers-found-vs-params.png").convert("RGB"))
    for i, colour in enumerate(COLOURS[:8]):
        count = int((scatter == np.array(colour)).all(-1).sum())
        assert (count > 20) == (i < len(METHODS)), (i, count)


def test_a_registered_method_or_composer_without_a_row_fails_the_report(monkeypatch: pytest.MonkeyPatch) -> None:
    import composers
    import trainers

    complete = parts()  # a part per method and composer registered now
    assemble(complete, meta())  # no error
    monkeypatch.setitem(trainers.METHODS, "fake_trainer", trainers.METHODS["dreambooth_lora"])
    with pytest.raises(StudioError, match="no row for trainer fake_trainer"):
        assemble(complete, meta())
    monkeypatch.delitem(trainers.METHODS, "fake_trainer")
    monkeypatch.setitem(composers.COMPOSERS, "fake_composer", composers.COMPOSERS["merge"])
    with pytest.raises(StudioError, match="no row for composer fake_composer"):
        assemble(complete, meta())


def test_parts_are_reused_by_key_rerun_when_stale_and_resumed_after_a_kill(tmp_path: Path) -> None:
    runs: list[Path] = []

    def work(folder: Path) -> dict:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "files").write_text("made")
        runs.append(folder)
        return {"value": len(runs)}

    unit = Unit("trainer-x", {"steps": 10}, work)
    logs: list[str] = []
    first = run_unit(tmp_path, unit, "commit-a", logs.append)
    assert first["result"] == {"value": 1} and not first["reused"]
    again = run_unit(tmp_path, unit, "commit-a", logs.append)
    assert again["reused"] and again["result"] == {"value": 1} and len(runs) == 1
    assert logs[-1] == f"trainer-x: reused from {first['finished']}"
    changed = run_unit(tmp_path, Unit("trainer-x", {"steps": 20}, work), "commit-a", logs.append)
    assert changed["result"] == {"value": 2} and "settings changed" in logs[-1]
    newer = run_unit(tmp_path, Unit("trainer-x", {"steps": 20}, work), "commit-b", logs.append)
    assert newer["result"] == {"value": 3} and "code changed" in logs[-1]
    assert part_key("a", "u", {"x": 1}) != part_key("b", "u", {"x": 1}) != part_key("a", "u", {"x": 2})

    # killed mid-unit: the part says "running" under the same key; the next run continues in the same folder
    def killed(folder: Path) -> dict:
        (folder / "partial").write_text("half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_unit(tmp_path, Unit("trainer-y", {}, lambda f: (f.mkdir(parents=True), killed(f))[1]), "commit-b")
    assert json.loads((tmp_path / "parts" / "trainer-y.json").read_text())["state"] == "running"
    resumed = run_unit(tmp_path, Unit("trainer-y", {}, lambda f: {"kept": (f / "partial").read_text()}), "commit-b")
    assert resumed["result"] == {"kept": "half"} and resumed["state"] == "done"

    # parts copied to another clone: a unit whose work folder later units read runs again without it
    shared = Unit("compose-adapters", {}, work, shared=True)
    made = run_unit(tmp_path, shared, "commit-b", logs.append)
    assert run_unit(tmp_path, shared, "commit-b", logs.append)["reused"]
    import shutil

    shutil.rmtree(tmp_path / "work" / "compose-adapters")
    again = run_unit(tmp_path, shared, "commit-b", logs.append)
    assert not again["reused"] and again["result"]["value"] == made["result"]["value"] + 1
    assert "not the work folder" in logs[-1] and (tmp_path / "work" / "compose-adapters" / "files").is_file()


def test_tree_id_follows_the_code_not_the_docs_or_the_commit(tmp_path: Path) -> None:
    assert tree_id(tmp_path) == "no-git" and commit_id(tmp_path) == "no-git"

    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(tmp_path), *args], capture_output=True, text=True,
                              check=True).stdout.strip()

    def commit(name: str, text: str) -> None:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
        git("add", name)
        git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", name)

    git("init", "-q")
    commit("a.py", "x = 1\n")
    code = tree_id(tmp_path)
    assert len(code) == 16 and commit_id(tmp_path) == git("rev-parse", "HEAD")
    commit("README.md", "# a report published\n")  # docs and tests alone: the same code, the parts stay good
    commit("docs/benchmarks/report.md", "| a | b |\n")
    commit("tests/test_a.py", "def test_a(): pass\n")
    assert tree_id(tmp_path) == code
    (tmp_path / "README.md").write_text("# edited, not committed\n")
    assert tree_id(tmp_path) == code and commit_id(tmp_path).endswith("+dirty")
    (tmp_path / "a.py").write_text("x = 2\n")  # code, uncommitted: another identity
    dirty = tree_id(tmp_path)
    assert dirty != code
    (tmp_path / "a.py").write_text("x = 3\n")
    assert tree_id(tmp_path) not in (code, dirty)
    commit("a.py", "x = 2\n")  # committed, it is the code the dirty tree had: any code change moves it
    assert tree_id(tmp_path) not in (code, dirty)


def test_compare_flags_a_composer_with_its_masks_off_as_worse() -> None:
    old = assemble(parts(seed=1, success={"lora_composer": 0.9}), meta())
    same = compare(old, copy.deepcopy(old))
    assert {e["verdict"] for e in same} == {"same"}
    # Masks off: the two subjects blend and the emblem leaks into the other object, so most images fail; a
    # re-run of the same code (other seeds of the judgement noise) stays within the margins.
    new = copy.deepcopy(old)
    row = next(r for r in new["composers"] if r["composer"] == "lora_composer")
    for kind in ("two_subjects", "subject_object"):
        raw = row["kinds"][kind]["raw"]["success"]
        raw[:] = [0] * len(raw)
        row["kinds"][kind]["success"] = 0.0
    entries = compare(old, new)
    worse = [(e["where"], e["metric"]) for e in entries if e["verdict"] == "worse"]
    assert worse == [("composer lora_composer, two subjects", "success"),
                     ("composer lora_composer, subject object", "success")]
    rerun = assemble(parts(seed=1, success={"lora_composer": 0.9}), meta())
    assert not [e for e in compare(old, rerun) if e["verdict"] != "same"]


def test_noise_margin_is_twice_the_standard_error_of_the_difference() -> None:
    # pooled p = 0.5 over 50 + 50 judgements: 2 * sqrt(0.25 * 0.04) = 0.2
    assert margin_raw([1, 0] * 25, [1, 0] * 25) == pytest.approx(0.2)
    assert margin_raw([1] * 10, [1] * 10) == 0.0  # nothing moved, no noise
    assert margin_raw([0.2, 0.4], [0.2, 0.4]) == pytest.approx(2 * (0.01 / 2 + 0.01 / 2) ** 0.5)


def test_cli_compare_of_two_reports_exits_1_on_a_regression(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from studio.cli import main as studio

    old = write_report(tmp_path / "old", seed=2, success={"clora": 0.9})
    new = copy.deepcopy(old)
    row = next(r for r in new["composers"] if r["composer"] == "clora")
    row["kinds"]["subject_style"]["raw"]["success"] = [0] * 8
    (tmp_path / "new.json").write_text(json.dumps(new))
    assert studio(["bench", "report", "--compare", str(tmp_path / "old" / "report.json"), "--new",
                   str(tmp_path / "new.json")]) == 1
    worse = r"\n\| worse \| composer clora, subject style \| success \| [\d.]+ \| 0 \|"
    assert re.search(worse, capsys.readouterr().out)
    assert studio(["bench", "report", "--compare", str(tmp_path / "missing.json"), "--new",
                   str(tmp_path / "new.json")]) == 2


def test_training_peak_measures_memory_the_block_adds() -> None:
    """In a fresh process: in one that earlier tests used, the allocator may serve the block from memory it already
    holds, and the peak rises by nothing."""
    import subprocess
    import sys

    code = ("import json, torch\nfrom benches.judging import training_peak\n"
            "with training_peak('cpu') as peak:\n"
            "    block = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched\n"
            "    del block\n"
            "print(json.dumps(peak))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    peak = json.loads(done.stdout.strip().splitlines()[-1])
    assert 50 <= peak["peak_memory_mb"] <= 200, peak


def test_peak_memory_is_the_fresh_process_run_where_a_part_has_one() -> None:
    """The headline's and the figure's memory per method: its fresh-process run; parts from before those runs fall back
    to the mean of the adapters' in-process peaks, and say so."""
    from benches.report_tables import headline, memory_kind, peak_memory

    report = assemble(parts(), meta())
    sara = report["trainer_memory"]["sara"]["peak_memory_mb"]
    assert 900 <= peak_memory(report, "sara") == sara <= 1000  # not the rows' in-process 200-210 MB
    assert any(line.startswith("| sara |") and line.endswith(f" {sara:.0f} |") for line in headline(report))
    assert memory_kind(report) == "cpu peak rss of a fresh process, 6 steps"
    old = parts()
    for name in old:
        old[name].get("result", {}).pop("memory", None)
    before = assemble(old, meta())
    assert before["trainer_memory"] == {} and 200 <= peak_memory(before, "sara") <= 210
    assert "depends on what ran before" in memory_kind(before)
    heavier = copy.deepcopy(report)
    heavier["trainer_memory"]["sara"]["peak_memory_mb"] *= 1.3  # beyond the 15% margin
    worse = [(e["where"], e["metric"]) for e in compare(report, heavier) if e["verdict"] != "same"]
    assert worse == [("trainer sara, fresh process", "peak_memory_mb")]


def test_a_cancelled_run_stops_between_parts(tmp_path: Path) -> None:
    import threading

    from benches.report import QUICK, Cancelled, run_report

    cancel = threading.Event()
    cancel.set()
    seen: list[tuple[int, int, str]] = []
    with pytest.raises(Cancelled, match="stopped before compose-adapters; 0 of"):
        run_report(tmp_path, settings=QUICK, cancel=cancel, progress=lambda *a: seen.append(a))
    assert seen == [] and not (tmp_path / "parts").exists()


def test_the_base_accuracy_is_measured_once_for_every_trainer(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from benches import adapters
    from benches import train as train_bench
    from benches.report import QUICK, plan
    from trainers import METHODS

    measured: list[tuple] = []
    given: list[dict | None] = []

    def base_single_accuracy(model: str, n_base: int, steps: int, device: str = "cpu") -> dict:
        measured.append((model, n_base, steps, device))
        return {"mean": 0.9, "n": n_base}

    def run_bench(model: str, methods: list[str], out: Path, **options: object) -> dict:
        given.append(options.get("base"))  # type: ignore[arg-type]
        return {"rows": []}

    def measure(method: str, model: str, steps: int, threads: int, device: str = "auto") -> dict:
        return {"peak_memory_bytes": 3 * 2**30, "peak_memory_kind": "cpu peak rss of a fresh process"}

    monkeypatch.setattr(adapters, "base_single_accuracy", base_single_accuracy)
    monkeypatch.setattr(adapters, "run_bench", run_bench)
    monkeypatch.setattr(train_bench, "measure", measure)
    units = [u for u in plan(tmp_path, QUICK, "studio-tiny", "cpu")
             if u.name == "base-accuracy" or u.name.startswith("trainer-")]
    assert units[0].name == "base-accuracy" and len(units) == len(METHODS) + 1  # first: the trainers read it
    for unit in units:
        run_unit(tmp_path, unit, "commit-a", lambda line: None)
    assert measured == [("studio-tiny", QUICK["n_base"], QUICK["steps"], "cpu")]
    assert given == [{"mean": 0.9, "n": QUICK["n_base"]}] * len(METHODS)
    memory = json.loads((tmp_path / "parts" / "trainer-sara.json").read_text())["result"]["memory"]
    assert memory == {"peak_memory_mb": 3072.0, "kind": "cpu peak rss of a fresh process, 6 steps", "steps": 6}
    (tmp_path / "parts" / "base-accuracy.json").unlink()  # a trainer without it: a clear error, no guess
    with pytest.raises(StudioError, match="base-accuracy.json is not finished; run `studio bench report` again"):
        units[1].run(tmp_path / "work" / units[1].name)


def test_composer_parts_only_time_their_alone_row(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import composers
    from benches import compose
    from benches.report import QUICK, plan

    calls: dict[str, tuple] = {}

    def run_bench(model: str, library: Path, rows: list[str], *args: object, **options: object) -> dict:
        calls[",".join(rows) or "controls"] = (options["controls"], options["timed_only"])
        return {}

    monkeypatch.setattr(compose, "run_bench", run_bench)
    for unit in plan(tmp_path, QUICK, "studio-tiny", "cpu"):
        if unit.name == "compose-controls" or unit.name.startswith("composer-"):
            unit.run(tmp_path / "work" / unit.name)
    assert calls.pop("controls") == (compose.CONTROLS, ())  # the controls are judged once, in their own part
    assert calls == dict.fromkeys(composers.COMPOSERS, (("alone",), ("alone",)))


def _readme_checks(root: Path) -> None:
    """The README's Benchmarks table is the committed report's headline, its figure exists, the report covers the
    registries (a newly registered method needs the report run again)."""
    from benches.report_tables import missing_rows

    section = (root / "README.md").read_text().split("\n## Benchmarks\n", 1)[1].split("\n## ", 1)[0]
    committed = (root / "docs" / "benchmarks" / "report.md").read_text()
    headline = committed.split("\n## Headline\n", 1)[1].split("\n## ", 1)[0]
    table = [line for line in headline.splitlines() if line.startswith("|")]
    assert table and [line for line in section.splitlines() if line.startswith("|")] == table
    published = json.loads((root / "docs" / "benchmarks" / "report.json").read_text())
    command = "studio bench report" + (" --quick" if published["meta"]["quick"] else "")
    assert f"`{command}`" in section and command in committed  # the section names the command that made it
    images = re.findall(r"\]\((docs/benchmarks/[^)]+\.png)\)", section)
    assert images and all((root / image).is_file() for image in images)
    assert missing_rows(published) == []


def test_publish_puts_the_reports_headline_in_the_readme(tmp_path: Path) -> None:
    from benches.report_publish import publish

    root = Path(__file__).resolve().parents[2]
    (tmp_path / "README.md").write_text((root / "README.md").read_text())
    write_report(tmp_path / "report")
    publish(tmp_path / "report", tmp_path)
    _readme_checks(tmp_path)
    publish(tmp_path / "report", tmp_path)  # again: the section is replaced, not added
    assert (tmp_path / "README.md").read_text().count("\n## Benchmarks\n") == 1
    from studio.cli import main as studio

    assert studio(["bench", "report", "--no-run", "--out", str(tmp_path / "missing"), "--publish"]) == 2


def test_the_readmes_benchmarks_are_the_committed_report() -> None:
    root = Path(__file__).resolve().parents[2]
    if "\n## Benchmarks\n" not in (root / "README.md").read_text():
        pytest.skip("no report published yet (studio bench report --publish)")
    _readme_checks(root)
