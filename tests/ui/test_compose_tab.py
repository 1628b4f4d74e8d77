"""The Compose tab's actions: compose with adapters from the field and from prompt tags; the two-adapter sweep."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from composer_helpers import add_random_adapter

import composers
from studio.errors import StudioError
from studio.generate import cached_pipeline
from studio.pnginfo import read_parameters
from studio.ui.compose_tab import SWEEP_WEIGHTS, draw_layout, layout_lines, run_compose, run_sweep


@pytest.fixture()
def two_adapters(tiny_dirs: dict) -> str:
    pipe = cached_pipeline(str(tiny_dirs["sd1"]), "cpu")
    add_random_adapter(pipe, "alpha", seed=1)
    add_random_adapter(pipe, "beta", seed=2)
    return str(tiny_dirs["sd1"])


def test_compose_records_adapters_from_field_and_tags(two_adapters: str, tmp_path: Path) -> None:
    fields = {"model": two_adapters, "prompt": "a red star <lora:beta:0.5>", "adapters": "alpha:0.8",
              "composer": "switch", "tau": 1, "seed": 2, "steps": 3}
    paths, text = run_compose(fields, out_dir=tmp_path)
    params = read_parameters(paths[0])
    assert params["composer"] == "switch" and params["prompt"] == "a red star"
    assert {a["name"]: a["weight"] for a in params["adapters"]} == {"alpha": 0.8, "beta": 0.5}
    assert 'Lora weights: "alpha: 0.8, beta: 0.5", Composer: switch' in text  # A1111 quotes values with commas


def test_sweep_grid_corner_is_the_base_and_cells_differ(two_adapters: str) -> None:
    fields = {"model": two_adapters, "prompt": "a blue ring", "adapters": "alpha,beta", "seed": 1, "steps": 2}
    grid = np.asarray(run_sweep(fields))
    n = len(SWEEP_WEIGHTS)
    h, w = grid.shape[0] // n, grid.shape[1] // n
    cells = [grid[i * h:(i + 1) * h, j * w:(j + 1) * w].astype(int) for i in range(n) for j in range(n)]
    base = np.asarray(run_sweep({**fields, "adapters": "alpha,beta"}, weights=(0.0,))).astype(int)
    assert np.array_equal(cells[0], base)  # weights (0, 0): the model alone
    assert np.abs(cells[-1] - cells[0]).max() > 0 and np.abs(cells[1] - cells[n]).max() > 0
    with pytest.raises(StudioError, match="exactly two adapters"):
        run_sweep({**fields, "adapters": "alpha"})


def test_boxes_reach_lora_composer_and_the_layout_is_drawn(two_adapters: str, tmp_path: Path) -> None:
    boxes = "alpha:0,0,0.5,1\nbeta:0.5,0.25,1,0.75"
    fields = {"model": two_adapters, "prompt": "a alpha emblem on the left and a beta star on the right",
              "adapters": "alpha,beta", "composer": "lora_composer", "boxes": boxes, "seed": 0, "steps": 2}
    paths, _ = run_compose(fields, out_dir=tmp_path)
    params = read_parameters(paths[0])
    assert params["composer"] == "lora_composer"
    assert params["composer_config"]["boxes"] == {"alpha": [0, 0, 0.5, 1], "beta": [0.5, 0.25, 1, 0.75]}
    layout = np.asarray(draw_layout(boxes, size=100)).astype(int)
    assert (layout[50, 1] != 255).any() and (layout[50, 25] == 255).all()  # alpha's left edge; inside is blank
    assert (layout[25, 75] != 255).any() and (layout[10, 75] == 255).all()  # beta's top edge at y = 0.25
    with pytest.raises(StudioError, match="NAME:x0,y0,x1,y1"):
        draw_layout("alpha:0,0,1")


def test_layout_without_typed_boxes_comes_from_the_prompts_places(two_adapters: str, tmp_path: Path) -> None:
    fields = {"model": two_adapters, "prompt": "a alpha emblem on the left and a beta star on the top right",
              "adapters": "alpha,beta", "composer": "lora_composer", "tau": 5, "order": "beta,alpha"}  # Switch's
    assert layout_lines(fields) == "alpha:0,0.25,0.5,0.75\nbeta:0.5,0,1,0.5"
    assert layout_lines({**fields, "boxes": "alpha:0,0,1,1"}) == "alpha:0,0,1,1"  # typed boxes win
    assert layout_lines({**fields, "composer": "merge"}) == ""  # no boxes for a composer that takes none
    for composer in ("merge", "lora_composer", "cmlora"):  # tau goes to Switch alone, order to Switch and CMLoRA
        paths, _ = run_compose({**fields, "composer": composer, "steps": 1}, out_dir=tmp_path / composer)
        params = read_parameters(paths[0])
        assert params["composer"] == composer and "tau" not in params["composer_config"]
        assert params["composer_config"].get("order") == (["beta", "alpha"] if composer == "cmlora" else None)
    drawn = np.asarray(draw_layout(layout_lines(fields), size=100)).astype(int)
    assert (drawn[50, 1] != 255).any() and (drawn[10, 1] == 255).all()  # alpha's left edge, from y = 0.25 on
    assert (drawn[1, 75] != 255).any() and (drawn[75, 75] == 255).all()  # beta's top edge; its box ends at y = 0.5


def test_clora_concept_masks_checkbox_reaches_the_composer(two_adapters: str, tmp_path: Path) -> None:
    fields = {"model": two_adapters, "prompt": "a alpha emblem on the left and a beta star on the right",
              "adapters": "alpha,beta", "composer": "clora", "seed": 0, "steps": 2}
    for ticked in (False, True):
        paths, _ = run_compose({**fields, "concept_masks": ticked}, out_dir=tmp_path / str(ticked))
        assert read_parameters(paths[0])["composer_config"]["place_masks"] is (not ticked)
    paths, _ = run_compose({**fields, "composer": "merge", "concept_masks": True}, out_dir=tmp_path / "merge")
    assert read_parameters(paths[0])["composer"] == "merge"  # the checkbox belongs to CLoRA alone


def test_the_form_shows_each_composer_its_own_options(two_adapters: str) -> None:
    from studio.ui.compose_tab import compose_options, shown_options

    shown = {c: {name for name, v in shown_options(c).items() if v} for c in composers.COMPOSERS}
    assert shown == {"merge": set(), "composite": set(), "autolora": set(), "switch": {"tau", "order"},
                     "cmlora": {"order", "cache"}, "clora": {"concept_masks"}, "lora_composer": {"boxes"},
                     "multidiffusion": {"boxes"}}
    # what a hidden field still holds goes to no composer that does not take it
    left = {"model": two_adapters, "prompt": "a alpha emblem", "adapters": "alpha,beta", "tau": 3, "order": "beta",
            "cache": False, "concept_masks": True, "boxes": "alpha:0,0,0.5,1"}
    for composer in ("merge", "composite", "switch", "cmlora", "clora", "lora_composer"):
        config = compose_options({**left, "composer": composer})[2]
        assert getattr(config, "boxes", None) in (None, {"alpha": (0.0, 0.0, 0.5, 1.0)})
    assert compose_options({**left, "composer": "switch"})[2].tau == 3
