"""A1111 adapter tags in prompts: `<lora:name:weight>` (weight optional, default 1.0; `<lyco:...>` too).

Tags are removed from the text the text encoder sees, and returned as (name, weight) pairs in order of appearance.
"""

from __future__ import annotations

import re

from studio.configs import finite
from studio.errors import StudioError


_TAG = re.compile(r"<(?:lora|lyco):([^:>]+)(?::([^:>]*))?>", re.IGNORECASE)


def split_lora_tags(prompt: str) -> tuple[str, list[tuple[str, float]]]:
    """Return the prompt without its `<lora:...>` tags, and the tags as [(name, weight), ...]."""
    adapters: list[tuple[str, float]] = []
    for match in _TAG.finditer(prompt):
        name, weight = match.group(1).strip(), (match.group(2) or "1").strip()
        try:
            adapters.append((name, finite(weight, "the weight")))
        except StudioError as err:
            raise StudioError(f"bad weight in {match.group(0)!r}: {err}; write <lora:{name}:0.8>") from None
    text = _TAG.sub("", prompt)
    text = re.sub(r"\s+([,.])", r"\1", re.sub(r"\s{2,}", " ", text)).strip(" ,")
    return text, adapters
