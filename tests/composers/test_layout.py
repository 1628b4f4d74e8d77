"""Boxes from the prompt's position words: the rules, which adapters get one, and where the composers take them."""

from __future__ import annotations

import pytest
from composer_helpers import add_random_adapter
from tiny_models import BUILDERS

import composers
from composers import AdapterSet, LoraComposerConfig
from composers.layout import place_box, placement_tip, prompt_layout
from composers.multidiffusion import MultiDiffusionConfig


@pytest.mark.parametrize(("words", "box"), [
    (["left"], (0.0, 0.25, 0.5, 0.75)),  # the open axis: its middle half
    (["right"], (0.5, 0.25, 1.0, 0.75)),
    (["top"], (0.25, 0.0, 0.75, 0.5)),
    (["top", "right"], (0.5, 0.0, 1.0, 0.5)),
    (["lower", "left", "corner"], (0.0, 0.5, 0.5, 1.0)),
    (["center"], (0.25, 0.25, 0.75, 0.75)),
    (["bottom", "middle"], (0.25, 0.5, 0.75, 1.0)),
    (["Left,"], (0.0, 0.25, 0.5, 0.75)),
    (["side"], None),
    ([], None),
])
def test_position_words_give_a_box(words: list[str], box: tuple | None) -> None:
    assert place_box(words) == box


def test_each_subject_takes_its_own_clause_place_and_styles_none() -> None:
    triggers = {"a": ["sks"], "b": ["zwx"], "s": ["qst"]}
    two = "a large sks emblem on the left and a large zwx emblem in the top right corner on a white background"
    assert prompt_layout(two, triggers) == {"a": (0.0, 0.25, 0.5, 0.75), "b": (0.5, 0.0, 1.0, 0.5)}
    swapped = "a large zwx emblem on the left and a large sks emblem on the right"
    assert prompt_layout(swapped, triggers) == {"b": (0.0, 0.25, 0.5, 0.75), "a": (0.5, 0.25, 1.0, 0.75)}
    # the circle's place is not the emblem's; a clause without a place gives no box
    assert prompt_layout("a sks emblem on the left and a small blue circle on the right", triggers) == {
        "a": (0.0, 0.25, 0.5, 0.75)}
    assert prompt_layout("a sks emblem and a zwx emblem", triggers) == {}
    styled = "a sks emblem in the center on a white background, in qst style"
    assert prompt_layout(styled, triggers, subjects=["a", "b"]) == {"a": (0.25, 0.25, 0.75, 0.75)}


def test_a_trigger_of_several_words_places_its_clause_and_marks_its_words() -> None:
    from composers.concepts import trigger_positions

    triggers = {"a": ["sks olis"], "b": ["mfw tpl"]}
    two = "a large sks olis emblem on the left and a large mfw tpl emblem on the right on a white background"
    assert prompt_layout(two, triggers) == {"a": (0.0, 0.25, 0.5, 0.75), "b": (0.5, 0.25, 1.0, 0.75)}
    # every word of the trigger, together and in order: one of its words alone is not the trigger
    assert prompt_layout("a large olis emblem on the left and a mfw tpl emblem on the right", triggers) == {
        "b": (0.5, 0.25, 1.0, 0.75)}
    assert trigger_positions(two, ["sks olis"]) == [2, 3]
    assert trigger_positions("olis sks and a sks emblem olis", ["sks olis"]) == []
    assert trigger_positions("a sks emblem", ["sks"]) == [1]


def test_boxed_composers_take_the_layout_only_without_typed_boxes() -> None:
    pipe = BUILDERS["sd1"]()
    add_random_adapter(pipe, "qa", 1, kind="subject")
    add_random_adapter(pipe, "qs", 2, kind="style")
    prompt = "a qa emblem on the right on a white background in qs style"
    adapters = AdapterSet.parse("qa,qs").resolve()
    for config in (LoraComposerConfig(), MultiDiffusionConfig()):  # the style gets no box: it acts everywhere
        assert config.with_layout(prompt, adapters).boxes == {"qa": (0.5, 0.25, 1.0, 0.75)}
    typed = LoraComposerConfig(boxes={"qa": (0.0, 0.0, 0.3, 0.3)})
    assert typed.with_layout(prompt, adapters).boxes == typed.boxes
    assert LoraComposerConfig(layout=False).with_layout(prompt, adapters).boxes == {}
    _, _, config = composers.from_options(prompt, "qa,qs", "lora_composer")
    assert config.boxes == {"qa": (0.5, 0.25, 1.0, 0.75)}
    assert config.region_prompts["qa"].startswith("a qa emblem on the right")


def test_a_composer_that_acts_everywhere_gets_a_tip_when_the_prompt_places_a_subject() -> None:
    pipe = BUILDERS["sd1"]()
    add_random_adapter(pipe, "qa", 1, kind="subject")
    add_random_adapter(pipe, "qs", 2, kind="style")
    adapters = AdapterSet.parse("qa,qs").resolve()
    placed = "a qa emblem on the left and a small blue circle on the right"
    tip = placement_tip(placed, adapters, "merge")
    assert tip is not None and "places qa;" in tip and "--composer lora_composer" in tip
    assert placement_tip(placed, adapters, "lora_composer") is None
    assert placement_tip("a qa emblem and a blue circle", adapters, "merge") is None  # nothing placed
    assert placement_tip("a circle on the left in qs style", AdapterSet.parse("qs").resolve(), "merge") is None
