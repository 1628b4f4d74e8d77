"""Basis columns of orthogonal-adaptation adapters (trainers/methods/orthogonal.py), kept by the library.

Every orthogonal adapter of a base freezes its down-projections to `rank` columns of shared orthogonal bases drawn
from `basis_seed`; two adapters merge by a plain sum only when their columns are disjoint. An adapter's columns are
in its method config: `first_column` and `rank` for a trained one, `columns` (a list of [start, stop) pairs) for a
merge of several. The library allocates free blocks to new runs and refuses to sum adapters that share columns.
Their trigger rows (a token-table LoRA with one-hot down-projections) are the table's own basis columns: two adapters
whose rows move the same token do not sum free of interference either.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from studio.errors import StudioError
from studio.library.meta import is_embedding


METHOD = "orthogonal"


def columns_of(method_config: dict[str, Any]) -> list[tuple[int, int]]:
    """[start, stop) column ranges an orthogonal adapter occupies."""
    if "columns" in method_config:
        return [(int(a), int(b)) for a, b in method_config["columns"]]
    if method_config.get("first_column") is None:
        return []
    first = int(method_config["first_column"])
    return [(first, first + int(method_config["rank"]))]


def _overlap(a: tuple[int, int], b: tuple[int, int]) -> bool:
    return a[0] < b[1] and b[0] < a[1]


def _runs(library: Any) -> dict[str, dict[str, Any]]:
    """Unfinished orthogonal runs (a run folder with a checkpoint whose adapter is not in the library yet)."""
    out = {}
    for saved in sorted((Path(library.root) / ".runs").glob("*/config.json")):
        try:
            record = json.loads(saved.read_text())
        except (OSError, ValueError):
            continue
        if record.get("method") == METHOD and (saved.parent / "checkpoint.pt").is_file():
            out[saved.parent.name] = record.get("method_config") or {}
    return out


def taken_columns(library: Any, basis_seed: int, *, besides: str = "") -> dict[str, list[tuple[int, int]]]:
    """name -> columns held on `basis_seed`'s bases by library adapters and unfinished runs, other than `besides`."""
    held: dict[str, list[tuple[int, int]]] = {}
    for entry in library.list():
        config = entry.meta.method_config
        if entry.meta.method == METHOD and entry.name != besides and config.get("basis_seed") == basis_seed:
            held[entry.name] = columns_of(config)
    for name, config in _runs(library).items():
        if name != besides and name not in held and config.get("basis_seed") == basis_seed:
            held[name] = columns_of(config)
    return held


def free_columns(library: Any, name: str, basis_seed: int, rank: int) -> int:
    """The first column of a free block of `rank` columns for adapter `name` (its own unfinished run's, if any)."""
    own = _runs(library).get(name)
    if own and own.get("basis_seed") == basis_seed and own.get("rank") == rank and own.get("first_column") is not None:
        return int(own["first_column"])  # a resumed run keeps its columns
    held = [r for ranges in taken_columns(library, basis_seed, besides=name).values() for r in ranges]
    start = 0
    while any(_overlap((start, start + rank), r) for r in held):
        start += rank
    return start


def check_disjoint(adapters: list[tuple[str, dict[str, Any]]]) -> list[tuple[int, int]]:
    """The union of the adapters' columns (name, method config); a clear error when two share a basis or column."""
    seeds = {config.get("basis_seed") for _, config in adapters}
    if len(seeds) > 1:
        raise StudioError(f"these orthogonal adapters use different bases (basis seeds {sorted(seeds)}); a plain sum "
                          "of them is not interference-free: retrain one with the other's --basis-seed")
    seen: list[tuple[str, tuple[int, int]]] = []
    for name, config in adapters:
        for block in columns_of(config):
            for other, taken in seen:
                if _overlap(block, taken):
                    raise StudioError(
                        f"{name!r} and {other!r} share basis columns {max(block[0], taken[0])}-"
                        f"{min(block[1], taken[1]) - 1}, so their sum interferes; retrain one of them (the library "
                        "allocates free columns to a new orthogonal run) or merge with --combination svd"
                    )
            seen.append((name, block))
    return sorted(block for _, block in seen)


def check_rows(adapters: list[tuple[str, dict[str, torch.Tensor]]]) -> None:
    """A clear error when two adapters' (name, canonical tensors) trigger rows move the same token of one table."""
    owner: dict[tuple[str, int], str] = {}
    for name, state_dict in adapters:
        for key, down in state_dict.items():
            module = key.removesuffix(".lora_A.weight")
            if module == key or not is_embedding(module):
                continue
            for token in (down != 0).any(0).nonzero().flatten().tolist():  # down (r, vocab): its one-hot columns
                other = owner.setdefault((module, token), name)
                if other != name:
                    raise StudioError(
                        f"{name!r} and {other!r} both train token {token} of {module} (the same trigger word), so "
                        "their sum interferes; retrain one of them with another --trigger"
                    )
