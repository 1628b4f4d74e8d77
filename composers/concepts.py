"""Concepts of a prompt: which words belong to which adapter, and where their tokens sit in the encoded prompt.

Both spatial composers need the prompt split into concepts. A prompt like `a large sks emblem on the left and a
small blue circle on the right on a white background` has one concept per clause (split at `and` and commas; the
trailing `on a ... background` phrase belongs to no concept). A clause holding an adapter's trigger word is that
adapter's concept; the others are ordinary objects. Key words are the clause's words minus articles, prepositions,
sizes and positions (`sks emblem`, `blue circle`): their tokens form the concept's token group (CLoRA's
`important_token_indices`, LoRA-Composer's concept tokens); its position words (`left`) are kept apart (CLoRA's mask
tokens where a clause has them). Token positions are derived from the words, never typed
by hand (composers.md 1.8: the reference notebook's hand-typed indices were wrong).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any


POSITION_WORDS = frozenset("left right top bottom center centre middle corner upper lower side".split())
STOP_WORDS = frozenset("a an the on in of at to with and large small big tiny".split()) | POSITION_WORDS
_BACKGROUND = ("background",)


@dataclass
class Concept:
    """One clause of a prompt: its word positions, its key words' positions, and the adapter it belongs to."""

    words: list[int]  # indices into the prompt's whitespace words
    keys: list[int]  # the key words among them
    adapters: list[str] = field(default_factory=list)  # adapters whose trigger is in the clause (usually 0 or 1)
    places: list[int] = field(default_factory=list)  # its position words (`left` in `... on the left`)


def _clean(word: str) -> str:
    return re.sub(r"[^\w<>-]", "", word.lower())


def split_concepts(prompt: str, triggers: dict[str, list[str]]) -> list[Concept]:
    """The prompt's clauses as concepts; `triggers` maps adapter name -> its trigger words."""
    words = prompt.split()
    cleaned = [_clean(w) for w in words]
    background: set[int] = set()
    for i, w in enumerate(cleaned):  # `on a white background`: the scene's background, no concept's
        if w in _BACKGROUND:
            starts = [j for j in range(max(0, i - 4), i) if cleaned[j] in ("on", "in", "with")]
            background.update(range(starts[-1] if starts else i, i + 1))
    concepts, current = [], []
    for i, (raw, w) in enumerate(zip(words, cleaned)):
        if w == "and" or i in background:
            if current:
                concepts.append(current)
            current = []
            continue
        current.append(i)
        if raw.endswith((",", ";")):
            concepts.append(current)
            current = []
    if current:
        concepts.append(current)
    out = []
    for span in concepts:
        keys = [i for i in span if cleaned[i] and cleaned[i] not in STOP_WORDS]
        if not keys:
            continue
        clause = [cleaned[i] for i in span]
        owners = [n for n, ts in triggers.items() if any(_occurrences(clause, t) for t in ts)]
        out.append(Concept(span, keys, owners, [i for i in span if cleaned[i] in POSITION_WORDS]))
    return out


def _pieces(trigger: str) -> list[str]:
    """A trigger's cleaned words: a trigger may be several words (`sks olis`, `my dog`)."""
    return [w for w in (_clean(p) for p in trigger.split()) if w]


def _occurrences(cleaned: list[str], trigger: str) -> list[int]:
    """Start indices in `cleaned` (cleaned whitespace words) where every word of `trigger` follows in order."""
    pieces = _pieces(trigger)
    n = len(pieces)
    return [i for i in range(len(cleaned) - n + 1) if n and cleaned[i:i + n] == pieces]


def trigger_positions(prompt: str, words: list[str]) -> list[int]:
    """Indices of the prompt's whitespace words that spell one of the triggers `words` (case and punctuation
    ignored; a trigger of several words marks each of them where they stand together)."""
    cleaned = [_clean(w) for w in prompt.split()]
    found = {i + k for t in words for i in _occurrences(cleaned, t) for k in range(len(_pieces(t)))}
    return sorted(found)


def drop_words(prompt: str, positions: set[int]) -> str:
    """The prompt without the words at `positions` (word order and the rest untouched)."""
    return " ".join(w for i, w in enumerate(prompt.split()) if i not in positions)


def word_tokens(tokenizer: Any, prompt: str) -> list[list[int]]:
    """Token positions of each whitespace word of `prompt` in its encoding (BOS is 0; words past 76 get [])."""
    out, pos = [], 1
    limit = tokenizer.model_max_length - 1  # the last position holds EOS
    for word in prompt.split():
        n = len(tokenizer(word, add_special_tokens=False).input_ids)
        out.append([p for p in range(pos, pos + n) if p < limit])
        pos += n
    return out


def token_group(tokenizer: Any, prompt: str, word_positions: list[int]) -> list[int]:
    """Token positions of the given words of `prompt`."""
    tokens = word_tokens(tokenizer, prompt)
    return [t for i in word_positions for t in tokens[i]]


def adapter_triggers(names: list[str]) -> dict[str, list[str]]:
    """Adapter name -> trigger words from the library (the name itself when it has none)."""
    from studio.library import Library

    library = Library()
    return {n: list(library.get(n).meta.trigger_words or [n]) for n in names}


def region_prompt(prompt: str, concept: Concept) -> str:
    """The concept's own clause as a region prompt (LoRA-Composer's per-region prompt), background phrase kept."""
    words = prompt.split()
    tail = re.search(r"\s(on|in|with) an? \w+ background\b", prompt)
    clause = " ".join(words[i] for i in concept.words).rstrip(",;")
    return clause + (tail.group(0) if tail else "")


def region_prompts(prompt: str, names: list[str], given: dict[str, str] | None = None) -> dict[str, str]:
    """Adapter name -> its region prompt: `given` first, else the prompt's clause that holds its trigger, else the
    trigger words alone."""
    out = dict(given or {})
    missing = [n for n in names if n not in out]
    if missing:
        for concept in split_concepts(prompt, adapter_triggers(missing)):
            for name in concept.adapters:
                out.setdefault(name, region_prompt(prompt, concept))
        for name in missing:
            out.setdefault(name, " ".join(adapter_triggers([name])[name]))
    return out
