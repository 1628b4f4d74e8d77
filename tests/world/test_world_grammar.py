"""Grammar: every word round-trips through caption -> parse -> caption; free phrasings parse; bad input fails."""

from __future__ import annotations

import itertools

import pytest

from studio.errors import StudioError
from studio.world.grammar import BACKGROUNDS, COLOURS, POSITIONS, SHAPES, SIZES, Scene, SceneObject, parse_caption


def test_every_word_round_trips() -> None:
    words = itertools.zip_longest(SHAPES, COLOURS, SIZES, POSITIONS, BACKGROUNDS)
    for shape, colour, size, position, bg in words:
        obj = SceneObject(shape or "star", colour or "red", size or "small", position or "left")
        other = SceneObject("ring", "blue", "large", "center" if (position or "left") != "center" else "right")
        scene = Scene((obj, other), bg or "white")
        assert parse_caption(scene.caption()) == scene
        assert parse_caption(scene.caption()).caption() == scene.caption()


def test_three_objects_and_corners() -> None:
    text = (
        "a small orange heart on the top left and a large white diamond on the bottom right "
        "and a small black cross on the center on a gray background"
    )
    scene = parse_caption(text)
    assert len(scene.objects) == 3 and scene.objects[0].position == "top left"
    assert scene.caption() == text


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("a red star", Scene((SceneObject("star", "red"),))),
        ("a red star on the left", Scene((SceneObject("star", "red", None, "left"),))),
        ("a large blue ring in the center", Scene((SceneObject("ring", "blue", "large", "center"),))),
        (
            "A big Red star at the top, a small green circle on the bottom, grey background",
            Scene(
                (SceneObject("star", "red", "large", "top"), SceneObject("circle", "green", "small", "bottom")), "gray"
            ),
        ),
        (
            "an orange diamond in the top right corner on a beige background",
            Scene((SceneObject("diamond", "orange", None, "top right"),), "beige"),
        ),
        (
            "a sks emblem on the left on a white background",
            Scene((SceneObject("emblem", None, None, "left"),), "white"),
        ),
    ],
)
def test_free_phrasings(text: str, expected: Scene) -> None:
    assert parse_caption(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "",
        "a red on the left",
        "a pink star on a teal background",
        "a star on the left and a ring on the left",
        "a star and a ring and a cross and a heart",
    ],
)
def test_bad_prompts_raise(text: str) -> None:
    with pytest.raises(StudioError):
        parse_caption(text)
