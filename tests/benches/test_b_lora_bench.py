"""`studio bench adapters --method b_lora`: the one-image rows (prompts, judgements, verdicts) and the block sweep."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch

from benches.b_lora import (
    CONCEPTS,
    LEAK_BAR,
    bar_rows,
    best_roles,
    both_prompts,
    content_prompts,
    judge_both,
    judge_content,
    missed,
    sweep,
)
from studio.world.datasets import textured_object
from studio.world.grammar import Scene
from studio.world.renderer import render


def test_prompts_ask_for_the_object_elsewhere_and_the_training_image() -> None:
    placed = content_prompts("stripes", "vgl", "dots")
    assert len(placed) == 20 and len({(p.scene.objects[0].position, p.scene.background) for p in placed}) == 20
    obj = placed[0].scene.objects[0]
    assert all(p.text.endswith(" in dots style") and p.text.startswith("a large vgl on the") for p in placed)
    assert all(p.scene.objects[0].shape == obj.shape and p.scene.objects[0].texture is None for p in placed)
    same = both_prompts("stripes", "vgl", 3)
    assert [p.seed for p in same] == [0, 1, 2] and same[0].scene.objects[0].texture == "stripes"
    assert same[0].scene.objects[0].shape == obj.shape and same[0].scene.background == "white"


def test_judges_on_exact_renders() -> None:
    """The object in the new texture: kept, new texture found, no leak; in its own texture: the leak."""
    prompts = content_prompts("stripes", "vgl", "dots", 2)
    new = render([replace(p.scene, texture="dots") for p in prompts], 0)
    old = render([replace(p.scene, texture="stripes") for p in prompts], 0)
    content = judge_content(list(new), prompts, "stripes", "dots")
    assert content.pop("raw") == {"shape": [1, 1], "colour": [1, 1], "leak": [0, 0], "new_texture": [1, 1]}
    assert content == {"shape": 1.0, "colour": 1.0, "new_texture": 1.0, "leak": 0.0}
    assert judge_content(list(old), prompts, "stripes", "dots")["leak"] == 1.0
    same = both_prompts("stripes", "vgl", 2)
    assert judge_both(list(render([p.scene for p in same], 0)), same, "stripes")["reproduced"] == 1.0
    other = Scene((replace(same[0].scene.objects[0], colour="blue"),), "white")  # another object
    judged = judge_both([render(other, 0)], same[:1], "stripes")
    assert (judged["shape"], judged["colour"], judged["reproduced"]) == (1.0, 0.0, 0.0)


def test_sweep_picks_the_roles_that_separate() -> None:
    base = {"T": 0.0, "P": 1.0, "O": 0.2, "L": 0.0}
    measured = {"a": {"T": 0.0, "P": 1.0, "O": 0.9, "L": 0.1}, "b": {"T": 0.9, "P": 0.9, "O": 0.2, "L": 0.0}}
    assert best_roles(measured, base) == {"content": "a", "style": "b", "score": 1.4}
    assert best_roles(dict(reversed(measured.items())), base)["content"] == "a"
    assert best_roles({"a": base, "b": base}, base)["score"] == 0.0  # entries that move nothing separate nothing


def test_missed_names_each_bar() -> None:
    row = {"seconds": 100.0, "style": {"texture": 0.9, "shape": 0.9, "colour": 0.85, "position": 1.0},
           "content_word": {"shape": 0.9, "colour": 0.9, "new_texture": 0.75, "leak": 0.1},
           "both": {"reproduced": 0.85}}  # fmt: skip
    assert missed(row) == []
    worse = {**row, "seconds": 400.0, "content_word": {**row["content_word"], "leak": LEAK_BAR + 0.05},
             "style": {**row["style"], "colour": 0.5}}  # fmt: skip
    assert missed(worse) == ["style shape/colour/position", "content leak", "seconds"]


SMALL = {"train_steps": 1, "batch_size": 1, "sample_steps": 1, "device": "cpu"}


def _training_image(prompts: list[str], seeds: list[int]) -> list[torch.Tensor]:
    """Every prompt drawn as the first concept's training render (a stand-in sampler: quick to judge)."""
    scene = Scene((textured_object(CONCEPTS[0][0]),), "white")
    return [render(scene, seed) for seed in seeds]


def test_bar_rows_and_sweep_run_end_to_end(tiny_dirs: dict, tmp_path: Path) -> None:
    from studio.models import load_pipeline

    model = str(tiny_dirs["sd1"])
    pipe = load_pipeline(model)
    grid: dict = {}
    rows = bar_rows(model, tmp_path / "lib", _training_image, pipe, SMALL, grid, n=2)
    assert [r["concept"] for r in rows] == ["stripes", "dots"] and all(r["missed"] == missed(r) for r in rows)
    stripes, dots = rows
    assert stripes["both"]["reproduced"] == 1.0 and dots["both"]["reproduced"] == 0.0  # what the stand-in draws
    assert stripes["content_word"]["leak"] == 1.0 and stripes["content_word"]["new_texture"] == 0.0
    assert stripes["content_word"]["shape"] == 1.0 and dots["content_word"]["leak"] == 0.0
    assert len(grid) == 8 and stripes["seconds"] > 0
    pair = ("up_blocks.1.attentions.0", "up_blocks.2.attentions.1")
    swept = sweep(model, tmp_path / "sweep", train_steps=1, n=1, candidates=(pair,), overrides=SMALL,
                  generate_fn=_training_image)  # fmt: skip
    assert {swept[0]["content"], swept[0]["style"]} == set(pair)
    measured = swept[0]["blocks"][pair[0]]
    assert (measured["O"], measured["L"]) == (1.0, 1.0)  # the stand-in: the object in its texture
    assert len((tmp_path / "sweep" / "b-lora-sweep.md").read_text().splitlines()) == 4  # header, base, the pair
