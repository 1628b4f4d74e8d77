"""`studio bench gpu`: refuses cleanly without a GPU; with one, measures both step modes and a training run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from studio.cli import main


def test_without_a_gpu_the_bench_says_what_to_run_instead(capsys) -> None:
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    assert main(["bench", "gpu", "--out", "unused"]) == 2
    assert "needs a CUDA device" in capsys.readouterr().err


@pytest.mark.gpu
def test_the_bench_times_graphs_plain_and_training(tiny_dirs: dict, tmp_path: Path) -> None:
    assert main(["bench", "gpu", "--model", str(tiny_dirs["sd1"]), "--batch", "1", "--batch", "4", "--steps", "3",
                 "--runs", "2", "--train-steps", "8", "--out", str(tmp_path)]) == 0
    assert "lora_composer" in (tmp_path / "gpu-bench.md").read_text()
    report = json.loads((tmp_path / "gpu-bench.json").read_text())
    assert [r["batch"] for r in report["generation"]] == [1, 4]
    first = report["generation"][0]
    assert abs(first["fixed_ms"] + 3 * first["ms_per_step"] - first["graphs"]) < 0.05
    assert all(r["graphs"] > 0 and r["plain"] > 0 for r in report["generation"])
    training = report["training"]
    assert training["steps"] == 8 and training["graphs"]["s_per_step"] > 0 and training["plain"]["s_per_step"] > 0
    assert training["speedup"] == round(training["plain"]["s_per_step"] / training["graphs"]["s_per_step"], 2)
    assert "| CUDA graphs |" in (tmp_path / "gpu-bench.md").read_text()
    assert "| 4 |" in (tmp_path / "gpu-bench.md").read_text()


def test_the_composition_rows_run_side_by_side(tiny_dirs: dict) -> None:
    """On the CPU (the GPU run calls the same function): one adapter, LoRA-Composer with two, a mixed batch."""
    from benches.gpu import composition

    row = composition(str(tiny_dirs["sd1"]), "cpu", runs=1, steps=1, jobs=2)
    assert row["single_ms"] > 0 and row["lora_composer_ms"] > 0 and row["mixed_grouped_ms"] > 0
    assert abs(row["lora_composer_ratio"] - row["lora_composer_ms"] / row["single_ms"]) < 0.02
    assert row["lora_composer_plain_ms"] > 0 and row["lora_composer_no_reinit_ms"] > 0
    assert 0 < row["lora_composer_set_up_ms"] < row["lora_composer_ms"]
    assert abs(row["warm_speedup"] - row["single_cold_ms"] / row["single_ms"]) < 0.02
    assert abs(row["mixed_speedup"] - row["mixed_alone_ms"] / row["mixed_grouped_ms"]) < 0.02


def test_a_failed_section_is_reported_and_the_others_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The sections' own measurements are replaced here (they need CUDA): what is tested is the run around them."""
    import benches.gpu as gpu

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "a test device")
    rows = [{"batch": 1, "graphs": 2.0, "plain": 5.0, "speedup": 2.5}]
    monkeypatch.setattr(gpu, "generation", lambda *a: rows)

    def broken(*args: object) -> dict:
        raise RuntimeError("CUDA error: an illegal memory access was encountered\nmore lines")

    monkeypatch.setattr(gpu, "composition", broken)
    timing = {"graphs": {"s_per_step": 0.01, "projected_default_run_s": 9.0, "fixed_s": 2.0},
              "plain": {"s_per_step": 0.03, "projected_default_run_s": 23.0, "fixed_s": 2.0},
              "speedup": 3.0, "steps": 8, "default_steps": 700}
    monkeypatch.setattr(gpu, "training", lambda *a: timing)
    assert main(["bench", "gpu", "--out", str(tmp_path)]) == 1
    report = json.loads((tmp_path / "gpu-bench.json").read_text())
    assert report["generation"] == rows and report["training"] == timing
    assert report["composition"] == {"error": "RuntimeError: CUDA error: an illegal memory access was encountered"}
    text = (tmp_path / "gpu-bench.md").read_text()
    assert "Composition failed: RuntimeError: CUDA error" in text and "| CUDA graphs | 0.01 | 9.0 | 2.0 |" in text
    # the goals this run measured (not the failed composition's), the training one from the faster step mode
    assert [(g["measured"], g["most"], g["met"]) for g in report["goals"]] == [(2.0, 60.0, True), (9.0, 30.0, True)]
    assert "| studio-tiny, batch 1, 20 steps, CUDA graphs: ms per image | 2.0 | 60.0 | yes |" in text

    def stopped(*args: object) -> dict:
        raise KeyboardInterrupt  # a run cut short (Ctrl-C, a time limit)

    rows_two = {"single_ms": 30.0, "single_cold_ms": 90.0, "warm_speedup": 3.0, "lora_composer_ms": 36.0,
                "lora_composer_ratio": 1.2, "lora_composer_plain_ms": 90.0, "jobs": 4, "mixed_grouped_ms": 5.0,
                "mixed_alone_ms": 30.0, "mixed_speedup": 6.0}
    monkeypatch.setattr(gpu, "composition", lambda *a: rows_two)
    monkeypatch.setattr(gpu, "training", stopped)
    assert main(["bench", "gpu", "--out", str(tmp_path)]) == 130  # the CLI's exit status for an interrupt
    report = json.loads((tmp_path / "gpu-bench.json").read_text())
    assert report["generation"] == rows and report["composition"] == rows_two and "training" not in report
    text = (tmp_path / "gpu-bench.md").read_text()
    assert "| two adapters in boxes (lora_composer) | 36.0 (1.2x) |" in text
    assert "| the same, steps with plain launches | 90.0 |" in text
    assert report["goals"][-1] == {"goal": gpu.GOALS[2][1], "measured": 1.2, "most": 1.25, "met": True}


def test_goals_count_only_what_they_are_set_for() -> None:
    """Generation and training goals hold for the embedded base at 20 steps; the regional ratio for any base."""
    from benches.gpu import goals

    rows = [{"batch": 1, "graphs": 75.0, "plain": 300.0}, {"batch": 16, "graphs": 8.0, "plain": 40.0}]
    training = {"graphs": {"projected_default_run_s": 41.0}, "plain": {"projected_default_run_s": 120.0},
                "speedup": 2.9}
    report = {"model": "studio-tiny", "steps": 20, "generation": rows, "composition": {"lora_composer_ratio": 1.3},
              "training": training, "training_model": "studio-tiny"}
    assert [(g["measured"], g["met"]) for g in goals(report)] == [(75.0, False), (41.0, False), (1.3, False)]
    elsewhere = {**report, "model": "sd1 architecture, random weights (training: studio-tiny)",
                 "composition": {"lora_composer_ratio": 1.1}, "training_model": "/my/model"}
    assert [(g["measured"], g["met"]) for g in goals(elsewhere)] == [(1.1, True)]
    assert goals({**report, "steps": 4, "composition": {"error": "x"}, "training": {"error": "y"}}) == []


def test_an_architecture_is_timed_on_random_weights_and_training_keeps_the_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`--architecture sd1`: generation and composition get the folder `random_base` wrote (and `--jobs`), training
    `--model`."""
    import benches.gpu as gpu
    import benches.random_base

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "a test device")
    built, seen = [], {}
    monkeypatch.setattr(benches.random_base, "random_base", lambda family, out: built.append((family, out)) or out)
    rows = [{"batch": 1, "graphs": 2.0, "plain": 5.0, "speedup": 2.5}]
    monkeypatch.setattr(gpu, "generation", lambda model, *a: seen.update(generation=model) or rows)
    monkeypatch.setattr(gpu, "composition", lambda model, *a: seen.update(composition=model, jobs=a[-1]) or {})
    monkeypatch.setattr(gpu, "training", lambda model, *a: seen.update(training=model) or {})
    assert main(["bench", "gpu", "--architecture", "sd1", "--model", "studio-tiny", "--jobs", "4", "--out",
                 str(tmp_path)]) == 0
    [(family, folder)] = built
    assert family == "sd1" and seen == {"generation": str(folder), "composition": str(folder), "jobs": 4,
                                        "training": "studio-tiny"}
    report = json.loads((tmp_path / "gpu-bench.json").read_text())
    assert report["model"] == "sd1 architecture, random weights (training: studio-tiny)"
    assert "sd1 architecture, random weights" in (tmp_path / "gpu-bench.md").read_text()
