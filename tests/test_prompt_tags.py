from __future__ import annotations

import pytest

from studio.errors import StudioError
from studio.prompt_tags import split_lora_tags


def test_tags_are_removed_and_parsed_in_order() -> None:
    text, tags = split_lora_tags("a red star <lora:emblem-7:0.8>, on the left <LORA:stripes> <lyco:kron:-0.5>")
    assert text == "a red star, on the left"
    assert tags == [("emblem-7", 0.8), ("stripes", 1.0), ("kron", -0.5)]


def test_prompt_without_tags_is_unchanged() -> None:
    assert split_lora_tags("a large blue ring on the right") == ("a large blue ring on the right", [])


def test_bad_weight_says_how_to_write_it() -> None:
    with pytest.raises(StudioError, match="<lora:x:0.8>"):
        split_lora_tags("a star <lora:x:strong>")
