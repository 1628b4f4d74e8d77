"""`studio bench compose` scores every composer and the controls on the fixed pairs and writes table and grid."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest
from composer_helpers import add_random_adapter
from PIL import Image

import composers
from benches.compose import adapter_names, case_boxes, cases, gate_adapter_names, needed, score_image
from studio.cli import main
from studio.generate import cached_pipeline


def test_cases_cover_both_categories_with_distinct_triggers() -> None:
    all_cases = cases()
    assert sum(c.category == "two_subjects" for c in all_cases) >= 6
    assert sum(c.category == "subject_style" for c in all_cases) >= 6
    assert sum(c.category == "subject_object" for c in all_cases) == 4
    triggers = [t for t, _ in adapter_names().values()]
    assert len(set(triggers)) == len(triggers) == 6
    for case in all_cases:
        assert all(t not in case.caption.split() for t in triggers) and case.prompt != case.caption


def test_autolora_gates_learn_on_concepts_and_triggers_no_case_uses() -> None:
    from studio.world.emblems import emblem

    scored, gate = adapter_names(), gate_adapter_names()
    assert len(gate) >= 4 and not set(scored) & set(gate)
    assert not {t for t, _ in scored.values()} & {t for t, _ in gate.values()}
    sources = [json.dumps(src, sort_keys=True) for _, src in [*scored.values(), *gate.values()]]
    assert len(set(sources)) == len(sources)  # no concept is both scored and learned from
    glyphs = [emblem(src["world_emblem"]).glyph() for _, src in [*scored.values(), *gate.values()]
              if "world_emblem" in src]
    assert len(set(glyphs)) == len(glyphs)  # nor one look under two seeds


def test_a_category_needs_only_its_adapters() -> None:
    assert needed(["subject_style"], 2) == ["bench-emblem-101", "bench-texture-stripes", "bench-texture-checker"]
    assert needed(["two_subjects"], 1) == ["bench-emblem-101", "bench-emblem-202"]
    assert needed() == list(adapter_names())


def test_score_image_judges_the_asked_emblems() -> None:
    from benches.compose import _scene
    from studio.world.renderer import render

    case = next(c for c in cases() if c.category == "two_subjects")
    right = render(_scene(case), 0)  # an exact render of the asked pair
    swapped = render(_scene(type(case)(**{**case.__dict__, "emblems": case.emblems[::-1]})), 0)
    assert score_image(right, case)["composition_success"] == 1.0
    assert score_image(swapped, case)["composition_success"] == 0.0


def test_subject_style_succeeds_on_the_emblem_in_the_asked_texture() -> None:
    from dataclasses import replace

    from benches.compose import _scene
    from studio.world.renderer import render

    case = next(c for c in cases() if c.category == "subject_style")
    scene = _scene(case)
    styled = replace(scene, objects=(replace(scene.objects[0], texture=case.texture),))
    assert score_image(render(styled, 0), case)["composition_success"] == 1.0
    solid = score_image(render(scene, 0), case)  # the subject without the style
    assert solid["composition_success"] == 0.0 and solid["subject_fidelity"] == 1.0


def test_boxes_hold_their_emblems_and_both_right_needs_the_other_object() -> None:
    from benches.compose import _scene
    from studio.world.renderer import render

    pair = next(c for c in cases() if c.category == "two_subjects")
    boxes = list(case_boxes(pair).values())
    assert boxes[0][2] <= 0.5 <= boxes[1][0] and all(0 <= v <= 1 for b in boxes for v in b)  # left, right
    case = next(c for c in cases() if c.category == "subject_object")
    assert case.prompt.startswith("a large sks emblem on the left and a small blue circle on the right")
    right = render(_scene(case), 0)
    assert score_image(right, case)["both_right"] == 1.0
    recoloured = render(_scene(type(case)(**{**case.__dict__, "caption": case.caption.replace("blue", "red")})), 0)
    assert score_image(recoloured, case)["both_right"] == 0.0  # the leaked colour fails the other object


@pytest.mark.heavy
def test_bench_runs_end_to_end(tiny_dirs: dict, tmp_path: Path, monkeypatch, capsys) -> None:
    library = tmp_path / "bench-lib"
    monkeypatch.setenv("STUDIO_LIBRARY", str(library))
    pipe = cached_pipeline(str(tiny_dirs["sd1"]), "cpu")
    for i, (name, (trigger, _)) in enumerate(adapter_names().items()):
        add_random_adapter(pipe, name, seed=i, trigger=trigger, kind="style" if "texture" in name else "subject")
    out = tmp_path / "out"
    assert main(["bench", "compose", "--model", str(tiny_dirs["sd1"]), "--library", str(library), "--seeds", "1",
                 "--steps", "2", "--pairs", "1", "--category", "two_subjects", "--category", "subject_object",
                 "--out", str(out)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert list(report["rows"]) == [*composers.COMPOSERS, "alone", "none"]
    assert report["cases"] == {"two_subjects": 1, "subject_object": 1}
    assert report["rows"]["alone"]["time_ratio"] == 1.0
    single = statistics.median(report["raw_seconds"]["alone"])  # the ratio's reference, measured in the same run
    for row in ("merge", "composite", "none"):  # each row's ratio is its own median over the reference (no timing bar)
        ratio = statistics.median(report["raw_seconds"][row]) / single
        assert report["rows"][row]["time_ratio"] == pytest.approx(ratio, abs=1e-3)
    table = (out / "compose-bench.md").read_text()
    assert sum(line.startswith("| ") for line in table.splitlines()) == len(report["rows"]) + 1
    assert all(f"| {row} |" in table for row in ("lora_composer", "clora", "cmlora", "autolora"))
    assert "subject + object: both right" in table
    assert report["scoring_seconds"] > 0 and f"scoring took {report['scoring_seconds']:.0f} s" in table
    grid = Image.open(out / "compose-bench-grid.png")
    assert grid.size[1] > len(report["rows"]) * 32 and grid.size[0] > 2 * 32  # a row per bench row, 2 cases


def test_timed_only_rows_are_generated_and_timed_but_not_judged(tiny_dirs: dict, tmp_path: Path,
                                                                  monkeypatch) -> None:
    from benches import compose

    library = tmp_path / "bench-lib"
    monkeypatch.setenv("STUDIO_LIBRARY", str(library))
    pipe = cached_pipeline(str(tiny_dirs["sd1"]), "cpu")
    for i, name in enumerate(needed(("two_subjects",), 1)):
        add_random_adapter(pipe, name, seed=i, trigger=adapter_names()[name][0], kind="subject")
    judged: list[object] = []
    monkeypatch.setattr(compose, "score_image", lambda image, case: judged.append(image) or score_image(image, case))
    report = compose.run_bench(str(tiny_dirs["sd1"]), library, ["merge"], 2, 2, tmp_path / "out", pairs=1,
                               categories=("two_subjects",), controls=("alone",), timed_only=("alone",))
    assert len(judged) == 2  # merge's two seeds; "alone" (each adapter, two seeds) is not judged
    assert len(report["raw_seconds"]["alone"]) == 2 and report["rows"]["alone"] == {
        "time_ratio": 1.0, "install_seconds": report["rows"]["alone"]["install_seconds"]}
    assert list(report["raw"]) == ["merge"] and report["rows"]["merge"]["two_subjects"]["prompt_fidelity"] >= 0
    table = (tmp_path / "out" / "compose-bench.md").read_text()
    assert "| alone | timed only | timed only | timed only | 1.00x |" in table


def test_prompt_layout_reads_the_boxes_from_the_position_words(tiny_dirs: dict, tmp_path: Path, monkeypatch) -> None:
    from benches import compose

    library = tmp_path / "bench-lib"
    monkeypatch.setenv("STUDIO_LIBRARY", str(library))
    pipe = cached_pipeline(str(tiny_dirs["sd1"]), "cpu")
    for i, name in enumerate(needed(("two_subjects", "subject_object"), 1)):
        add_random_adapter(pipe, name, seed=i, trigger=adapter_names()[name][0], kind="subject")
    pair = next(c for c in cases() if c.category == "two_subjects")
    left, right = pair.adapters
    assert compose.composer_config("lora_composer", pair, "prompt").boxes == {
        left: (0.0, 0.25, 0.5, 0.75), right: (0.5, 0.25, 1.0, 0.75)}
    assert compose.composer_config("lora_composer", pair).boxes == case_boxes(pair)  # the scene's
    one = next(c for c in cases() if c.category == "subject_object")  # the emblem's place, not the circle's
    assert compose.composer_config("multidiffusion", one, "prompt").boxes == {one.adapters[0]: (0.0, 0.25, 0.5, 0.75)}
    report = compose.run_bench(str(tiny_dirs["sd1"]), library, ["lora_composer"], 1, 2, tmp_path / "out", pairs=1,
                               categories=("two_subjects",), controls=(), layout="prompt")
    assert report["layout"] == "prompt" and "lora_composer" in report["raw"]
    assert "boxes from the prompt's position words" in (tmp_path / "out" / "compose-bench.md").read_text()


def test_prepare_never_reuses_an_emblem_trained_on_other_renders(tmp_path: Path) -> None:
    from benches.compose import prepare
    from studio.errors import StudioError

    entry = tmp_path / "bench-emblem-101"
    entry.mkdir()
    (entry / "adapter_config.json").write_text("{}")
    (entry / "train_config.json").write_text(json.dumps({"world_emblem": 101}))  # before --world-objects: 1
    assert prepare("studio-tiny", tmp_path, 2, ["bench-emblem-101"], {"world_objects": 1}) == []  # same renders
    with pytest.raises(StudioError, match="--world-objects 1, not 2"):
        prepare("studio-tiny", tmp_path, 2, ["bench-emblem-101"])  # the default: renders with company
    (entry / "train_config.json").write_text("{damaged")
    with pytest.raises(StudioError, match="--world-objects unknown, not 1"):
        prepare("studio-tiny", tmp_path, 2, ["bench-emblem-101"], {"world_objects": 1})


def test_gate_steps_train_the_gate_set_and_never_the_scored_adapters(tmp_path: Path, monkeypatch) -> None:
    import argparse

    from benches import compose
    from composers import autolora_train

    calls: dict[str, list] = {"prepare": [], "gate": []}
    monkeypatch.setattr(compose, "prepare", lambda *a, **k: calls["prepare"].append(a) or [])
    monkeypatch.setattr(autolora_train, "train_gate", lambda pipe, names, **k: calls["gate"].append((names, k)))
    monkeypatch.setattr(compose, "run_bench", lambda *a, **k: {})
    monkeypatch.setattr("studio.generate.cached_pipeline", lambda *a, **k: None)
    args = argparse.Namespace(model="studio-tiny", library=str(tmp_path), category=["subject_style"], prepare=False,
                              train_steps=None, pairs=None, world_objects=2, autolora_gate_steps=7, composer=["merge"],
                              seeds=1, steps=2, out=str(tmp_path / "out"), layout="world")
    assert compose.run(args) == 0
    (names, options), = calls["gate"]
    assert names == list(gate_adapter_names()) and options["steps"] == 7
    (prepared,) = calls["prepare"]
    assert set(prepared[-1]) == set(gate_adapter_names())  # what the gates learn from is trained first
