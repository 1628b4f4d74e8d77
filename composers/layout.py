"""A layout from the prompt's own position words, for the boxed composers when no box is given.

LoRA-Composer (Yang et al., arXiv:2403.11627, section 3.1: "the layout ... provided by the user") and MultiDiffusion's
region mode (Bar-Tal et al., arXiv:2302.08113, section 4.2) take one box per subject. LLM-grounded diffusion (Lian et
al., arXiv:2305.13655, stage 1) draws that layout from the prompt with a language model. Ours, without one: a subject
adapter's box comes from the position words of the clause that holds its trigger (`... emblem on the left`), by the
fixed rules of `place_box`. A subject whose clause names no place gets no box (it then acts everywhere, or the
composer asks for a box), so a prompt without position words is composed as before.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from composers.concepts import _clean, split_concepts
from composers.regions import Box


# Each axis's span in image fractions (origin top-left) per word. An axis the words leave open takes its middle half,
# so every box is the half-size square centred in the part of the image the words name (`left`: the left half's
# middle; `top left`: that quarter; `center`: the middle). LoRA-Composer wants boxes about the subject's size: on the
# compose bench's pairs, full-height half boxes gave two subjects 0.12 and subject + object 0.56, boxes of 3/4 height
# 0.73 and 0.69, these squares 0.96 and 0.94, as the scenes' own boxes (8 seeds, 2 CPU threads).
HORIZONTAL = {"left": (0.0, 0.5), "right": (0.5, 1.0)}
VERTICAL = {"top": (0.0, 0.5), "upper": (0.0, 0.5), "bottom": (0.5, 1.0), "lower": (0.5, 1.0)}
CENTRE_WORDS = frozenset({"center", "centre", "middle"})
MIDDLE = (0.25, 0.75)


def place_box(words: Iterable[str]) -> Box | None:
    """The box (x0, y0, x1, y1) that position words describe, e.g. ["top", "left"] -> the top-left quarter,
    ["left"] -> (0, 0.25, 0.5, 0.75); None when they name no place."""
    found = {_clean(w) for w in words}
    x = next((span for w, span in HORIZONTAL.items() if w in found), None)
    y = next((span for w, span in VERTICAL.items() if w in found), None)
    if x is None and y is None and not found & CENTRE_WORDS:
        return None
    (x0, x1), (y0, y1) = x or MIDDLE, y or MIDDLE
    return (x0, y0, x1, y1)


def prompt_layout(
    prompt: str, triggers: dict[str, list[str]], subjects: Sequence[str] | None = None
) -> dict[str, Box]:
    """Adapter name -> its box from the position words of the prompt's clause that holds its trigger.

    `triggers` maps each adapter to its trigger words; only `subjects` (default all) get boxes: styles act
    everywhere. A clause holding several subjects' triggers boxes each of them alike."""
    words = prompt.split()
    wanted = set(triggers if subjects is None else subjects)
    out: dict[str, Box] = {}
    for concept in split_concepts(prompt, triggers):
        box = place_box(words[i] for i in concept.places)
        for name in concept.adapters:
            if box is not None and name in wanted and name not in out:
                out[name] = box
    return out


def shared_regions(prompt: str, triggers: dict[str, list[str]], subjects: Sequence[str] | None = None
                   ) -> dict[str, dict[str, Box]]:
    """Adapter name -> {region prompt: box} for an adapter whose triggers sit in two or more placed clauses: one
    adapter holding several concepts (a merge of orthogonal adapters, a plain sum), each placed by its own clause."""
    from composers.concepts import region_prompt

    words = prompt.split()
    wanted = set(triggers if subjects is None else subjects)
    found: dict[str, dict[str, Box]] = {}
    for concept in split_concepts(prompt, triggers):
        box = place_box(words[i] for i in concept.places)
        for name in concept.adapters:
            if box is not None and name in wanted:
                found.setdefault(name, {})[region_prompt(prompt, concept)] = box
    return {n: regions for n, regions in found.items() if len(regions) > 1}


def subject_layout(prompt: str, adapters: Any) -> dict[str, Box]:
    """`prompt_layout` for an AdapterSet: its subjects (every adapter not of kind style), triggers from the library."""
    from composers.concepts import adapter_triggers

    kinds = dict(zip(adapters.names, adapters.kinds))
    subjects = [n for n in adapters.names if kinds.get(n) != "style"]
    return prompt_layout(prompt, adapter_triggers(list(adapters.names)), subjects)


# the composers that keep a subject to its own part, and AutoLoRA, which picks its own adapters
NO_TIP = ("lora_composer", "multidiffusion", "clora", "autolora")


def placement_tip(prompt: str, adapters: Any, composer: str) -> str | None:
    """A hint for a composer that applies every adapter everywhere when the prompt places a subject adapter (an
    AdapterSet): a second object then takes the subject's look, or one subject of two vanishes. None otherwise."""
    if composer in NO_TIP or not adapters.names:
        return None
    placed = subject_layout(prompt, adapters)
    if not placed:
        return None
    return (f"tip: the prompt places {', '.join(placed)}; --composer lora_composer keeps each subject in its place "
            "(boxes from the prompt's position words); with --composer "
            f"{composer} every adapter acts on the whole image, and a subject beside another object tends to lose "
            "its look or vanish")
