"""`studio bench adapters` trains, generates, judges and writes its table; the verdict applies every bar."""

from __future__ import annotations

from pathlib import Path

import pytest

from benches.adapters import (
    DRIFT_BAR,
    emblem_prompts,
    eval_emblems,
    run_bench,
    texture_prompts,
    verdict,
)
from studio.errors import StudioError


def test_prompts_cover_every_position_and_background() -> None:
    seed = eval_emblems(1)[0]
    assert eval_emblems(3)[0] == seed and len(set(eval_emblems(3))) == 3  # deterministic, distinct
    prompts = emblem_prompts(seed, "sks")
    assert len(prompts) == 20
    assert {(p.scene.objects[0].position, p.scene.background) for p in prompts} == {
        (p, b) for p in ("left", "right", "top", "bottom", "center") for b in ("white", "black", "gray", "beige")
    }
    assert all("sks emblem" in p.text and p.scene.objects[0].emblem == seed for p in prompts)
    styled = texture_prompts("dots", "vgl", 5)
    assert len(styled) == 5 and all(p.text.endswith(" in vgl style") and p.scene.texture == "dots" for p in styled)


def test_verdict_names_each_missed_bar() -> None:
    good = {"kind": "emblem", "emblem": 0.9, "position": 0.85, "background": 1.0, "drift": 0.0, "seconds": 100.0}
    assert verdict(good) == []
    bad = {**good, "emblem": 0.5, "drift": DRIFT_BAR + 0.01, "seconds": 301.0}
    assert verdict(bad) == ["emblem", "drift", "seconds"]
    texture = {"kind": "texture", "texture": 0.9, "shape": 0.9, "colour": 0.7, "position": 0.9, "seconds": 10.0}
    assert verdict(texture) == ["colour"]


# Two steps on 3 renders, one image a step, 2 class images: the bench's whole path (training with prior preservation,
# every judgement, the ratio rule, the files), not its figures, which `studio bench adapters` measures.
SMALL = {"train_steps": 2, "sample_steps": 2, "batch_size": 1, "world_images": 3, "num_class_images": 2,
         "device": "cpu"}


@pytest.mark.heavy
def test_bench_runs_end_to_end(tiny_dirs: dict, tmp_path: Path) -> None:
    report = run_bench(str(tiny_dirs["sd1"]), ["dreambooth_lora", "kronecker"], tmp_path, steps=2, n_base=2,
                       n_texture=2, overrides=SMALL, n_emblems=1, n_emblem=3)
    rows = report["rows"]
    kinds = [(r["method"], r["kind"]) for r in rows]
    assert kinds == [(m, k) for m in ("dreambooth_lora", "kronecker") for k in ("emblem", "texture")]
    for r in rows:
        assert r["trainable_params"] > 0 and r["seconds"] > 0 and r["missed"] == verdict(r)
        judged = ("emblem", "position", "background") if r["kind"] == "emblem" else ("texture", "shape", "colour")
        assert all(0.0 <= r[k] <= 1.0 for k in judged)
    assert all(len(r["raw"]["emblem"]) == 3 for r in rows if r["kind"] == "emblem")  # n_emblem of the 20 places
    assert rows[0]["params_ratio"] == 1.0 and 0 < rows[2]["params_ratio"] < 1  # Kronecker: fewer parameters
    assert set(report["base_accuracy"]) == {"shape", "colour", "position", "background", "mean", "raw"}
    for key, judgements in report["base_accuracy"]["raw"].items():  # the per-image judgements behind each fraction
        assert len(judgements) <= 2 and all(j in (0, 1) for j in judgements)
        if judgements:
            assert sum(judgements) / len(judgements) == pytest.approx(report["base_accuracy"][key], abs=1e-3)
    given = {**report["base_accuracy"], "mean": 0.5}  # measured once by the caller (`studio bench report`)
    alone = run_bench(str(tiny_dirs["sd1"]), ["kronecker"], tmp_path / "k", steps=2, n_base=2, n_texture=2,
                      overrides=SMALL, n_emblems=1, base=given, n_emblem=3)  # ratio still against the LoRA
    assert [r["params_ratio"] for r in alone["rows"]] == [rows[2]["params_ratio"]] * 2
    emblem = alone["rows"][0]
    assert alone["base_accuracy"] is given and emblem["drift"] == round(0.5 - emblem["single_accuracy"]["mean"], 4)
    table = (tmp_path / "adapters-bench.md").read_text()
    assert table.count("| dreambooth_lora |") == 2 and "misses the bar" in table  # 2 steps on random weights
    assert report["overrides"] == {k: v for k, v in SMALL.items() if k != "device"}  # the run says what it changed
    assert "Training overrides: --train-steps 2 --sample-steps 2 --batch-size 1 --world-images 3" in table
    assert (tmp_path / "adapters-bench-grid.png").is_file() and (tmp_path / "adapters-bench.json").is_file()


def test_the_cli_overrides_reach_the_training(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import argparse

    import benches.adapters as bench

    seen = {}

    def fake_run_bench(model: str, methods: list[str], out: Path, **kw: object) -> dict:
        seen.update(kw["overrides"])
        (out / "adapters-bench.md").parent.mkdir(parents=True, exist_ok=True)
        (out / "adapters-bench.md").write_text("table\n")
        return {"passed": {}}

    monkeypatch.setattr(bench, "run_bench", fake_run_bench)
    monkeypatch.setattr(bench.torch, "set_num_threads", lambda n: None)  # the other tests' threads stay as they are
    parser = argparse.ArgumentParser().add_subparsers()
    bench.register_bench(parser)
    args = parser.choices["adapters"].parse_args(["--train-steps", "175", "--batch-size", "8", "--lr", "2e-3",
                                                  "--threads", "1", "--out", str(tmp_path)])
    assert args.func(args) == 0
    assert seen == {"train_steps": 175, "batch_size": 8, "lr": 2e-3}
    seen.clear()
    for flag, value in (("--batch-size", "0"), ("--lr", "0"), ("--train-steps", "0")):  # refused before any work
        with pytest.raises(StudioError, match=f"{flag} must be"):
            args = parser.choices["adapters"].parse_args([flag, value, "--out", str(tmp_path)])
            args.func(args)
    assert seen == {}
