"""`studio bench base`: free phrasings, the prompt sets, scoring, the bench end to end and through the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from benches import base as base_bench
from benches.base import FREE_EVERY, asked_render, bar_prompts, run_bench, score
from studio.cli import main
from studio.world.datasets import sample_scenes
from studio.world.grammar import free_caption, parse_caption


@pytest.fixture
def sharp_templates(monkeypatch: pytest.MonkeyPatch) -> None:
    """Judge shapes against sharp templates only (no VAE round trips): exact renders need no more, and it is fast."""
    monkeypatch.setattr("studio.world.evaluator.shipped_vae", lambda: None)


def test_free_caption_round_trips() -> None:
    rng = np.random.default_rng(0)
    seen = {"size": 0, "position": 0, "background": 0, "reworded": 0}
    for scene in sample_scenes(300, 4, split="eval", objects=(1, 3)):
        text = free_caption(scene, rng)
        assert text != scene.caption()
        parsed = parse_caption(text)
        assert len(parsed.objects) == len(scene.objects), text
        for got, want in zip(parsed.objects, scene.objects):
            assert got.shape == want.shape and got.colour == want.colour, text
            assert got.size in (None, want.size) and got.position in (None, want.position), text
            assert got.position is not None or len(scene.objects) == 1, text
            seen["size"] += got.size is None
            seen["position"] += got.position is None
        assert parsed.background in (None, scene.background), text
        seen["background"] += parsed.background is None
        seen["reworded"] += any(w in text.lower() for w in (" in the ", " at the ", " to the ", " with a ", ", "))
    assert all(v >= 20 for v in seen.values()), seen
    assert free_caption(scene, np.random.default_rng(1)) == free_caption(scene, np.random.default_rng(1))


def test_bar_prompts() -> None:
    sets = bar_prompts(100, seed=0)
    assert list(sets) == ["single", "two"]
    for name, k in (("single", 1), ("two", 2)):
        entries = sets[name]
        assert len(entries) == 100
        free = 0
        for i, (prompt, scene, _) in enumerate(entries):
            assert scene == parse_caption(prompt) and len(scene.objects) == k
            assert all(o.colour != scene.background for o in scene.objects), prompt
            canonical = scene.is_complete() and prompt == scene.caption()
            assert canonical == (i % FREE_EVERY != 0), prompt
            free += not canonical
        assert free == 25
        assert len({seed for _, _, seed in entries}) == 100
    small = bar_prompts(6, seed=0)
    assert small == bar_prompts(6, seed=0)
    assert [p for p, _, _ in small["two"]] != [p for p, _, _ in bar_prompts(6, seed=1)["two"]]


def test_score_exact_renders_and_swapped(sharp_templates: None) -> None:
    sets = bar_prompts(6, seed=0)
    for name, entries in sets.items():
        scenes = [scene for _, scene, _ in entries]
        images = [asked_render(scene, seed) for _, scene, seed in entries]
        exact = score(images, scenes)
        for key in ("shape", "colour", "size", "position", "background", "present", "objects_correct"):
            assert exact[key] == 1.0, (name, key, exact)
        assert exact["asked"]["shape"] == len(entries) * len(scenes[0].objects)
        swapped = score(images[1:] + images[:1], scenes)
        assert swapped["objects_correct"] <= 0.34, (name, swapped)
        assert sum(swapped[k] for k in ("shape", "colour", "position")) / 3 < 0.6, (name, swapped)


def test_run_bench_with_injected_generator(tmp_path: Path, sharp_templates: None) -> None:
    def fake(prompt: str, seed: int, guidance: float) -> torch.Tensor:
        image = asked_render(parse_caption(prompt), seed)  # right at guidance 7.5, a grey blank at 1
        image = image if guidance == 7.5 else torch.full_like(image, 0.5)
        return torch.nn.functional.interpolate(image[None], scale_factor=2)[0]  # resized to 64x64

    report = run_bench("fake", 4, 2, [7.5, 1.0, 7.5], tmp_path, generate_fn=fake)
    assert list(report["results"]) == ["7.5", "1"]
    good, blank = report["results"]["7.5"], report["results"]["1"]
    assert good["passed"] and not good["missed"] and good["single"]["shape"] == 1.0
    assert not blank["passed"] and blank["two"]["present"] == 0.0 and "two objects_correct" in blank["missed"]
    assert not report["passed"] and report["free_prompts"] == {"single": 1, "two": 1}
    assert json.loads((tmp_path / "base-bench.json").read_text()) == report
    grid = Image.open(tmp_path / "base-bench-grid.png")
    assert grid.height > 8 * 128 and grid.width > 3 * 128  # 4 + 4 rows; asked render and two guidances


def test_cli_on_a_tiny_model(
    tiny_dirs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str], sharp_templates: None
) -> None:
    out = tmp_path / "bench"
    argv = ["bench", "base", "--model", str(tiny_dirs["sd1"]), "--n", "2", "--steps", "2", "--out", str(out)]
    assert main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    assert report == json.loads((out / "base-bench.json").read_text())
    assert list(report["results"]) == ["7.5"]  # the model recommends none: 7.5 twice, deduplicated
    result = report["results"]["7.5"]
    assert {"single", "two", "passed", "missed", "goal_met", "s_per_image"} <= set(result)
    assert result["single"]["images"] == 2 and result["two"]["asked"]["shape"] == 4
    assert report["bars"]["single"] == base_bench.SINGLE_BAR
    assert Image.open(out / "base-bench-grid.png").size[0] > 0
