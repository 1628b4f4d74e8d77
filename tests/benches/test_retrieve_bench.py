"""`studio bench retrieve`: its library plan, its prompts, and its scoring on a tiny library of random adapters."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from composer_helpers import add_random_adapter

from benches.retrieve import (
    FOLDS,
    NEW_CONCEPTS_HELD_OUT,
    NUM_EMBLEMS,
    TEXTURE_NAMES,
    Planned,
    _pooled,
    _write,
    plan,
    queries,
    score,
)
from studio.errors import StudioError
from studio.generate import cached_pipeline
from studio.library import Library
from studio.library.retrieval import RetrieverConfig, train_retriever
from studio.world.emblems import emblem


def test_the_plan_holds_out_new_concepts_and_second_adapters() -> None:
    planned = plan()
    names, triggers = [p.name for p in planned], [p.trigger for p in planned]
    assert len(set(names)) == len(names) and len(set(triggers)) == len(triggers)
    concepts = {p.concept for p in planned}
    assert len(concepts) == NUM_EMBLEMS + len(TEXTURE_NAMES)
    glyphs = [emblem(p.source["world_emblem"]).glyph() for p in planned if "world_emblem" in p.source]
    assert len(set(glyphs)) == NUM_EMBLEMS  # every emblem concept looks different
    seen = {p.concept for p in planned if not p.held_out}
    new = {p.concept for p in planned if p.held_out} - seen
    assert len(new) == NEW_CONCEPTS_HELD_OUT and all(c.startswith("emblem-") for c in new)
    seconds = [p for p in planned if p.held_out and p.concept in seen]  # a second adapter by another method
    assert seconds and all(p.method != q.method for p in seconds for q in planned
                           if q.concept == p.concept and not q.held_out)
    assert all(not any(t in text.split() for t in triggers) for text, _ in queries(planned[:3], 1))  # no trigger


def test_the_folds_make_every_emblem_new_once() -> None:
    """Cross-validation: the folds plan the same adapters, each holds out 3 other emblems (and the second adapters),
    and together they hold out every emblem once; the default plan is the last fold."""
    folds = [plan(f) for f in range(FOLDS)]
    assert all([p.name for p in f] == [p.name for p in folds[0]] for f in folds)
    new = []
    for f in folds:
        seen = {p.concept for p in f if not p.held_out}
        fold_new = {p.concept for p in f if p.held_out} - seen
        assert len(fold_new) == NEW_CONCEPTS_HELD_OUT
        firsts = {p.concept: p.name for p in reversed(f)}  # each concept's first adapter
        assert all(p.held_out == (p.name != firsts[p.concept] or p.concept in fold_new) for p in f)
        new += sorted(fold_new)
    assert sorted(new) == sorted({p.concept for p in folds[0] if p.concept.startswith("emblem-")})
    assert plan() == folds[-1]
    with pytest.raises(StudioError, match="folds 0 to"):
        plan(FOLDS)


def test_pooling_weights_each_fold_by_its_prompts(tmp_path: Path) -> None:
    """Two folds whose groups differ in size: pooled rates are per prompt, not the mean of the folds' rates; the
    table lists each fold."""
    def groups(n_new: int, new1: float) -> dict:
        return {"all": {"top1": 0.5, "top3": 1.0, "prompts": 10}, "held_out_concepts":
                {"top1": new1, "top3": 1.0, "prompts": n_new}, "new_concepts": {"top1": new1, "top3": 1.0,
                                                                                "prompts": n_new},
                "misses": [{"prompt": "p", "wanted": "a", "got": ["b"] * 3}]}

    runs = [{"fold": f, "new_concepts": [f"emblem-{f}"], "weights_only": groups(n, r), "with_metadata": groups(n, r)}
            for f, (n, r) in enumerate([(2, 0.0), (6, 0.5)])]
    pooled = _pooled(runs)
    assert pooled["weights_only"]["new_concepts"] == {"top1": 0.375, "top3": 1.0, "prompts": 8}  # 3 of 8, not 0.25
    assert pooled["weights_only"]["all"]["prompts"] == 20 and len(pooled["with_metadata"]["misses"]) == 2
    report = {"adapters": 2, "concepts": 2, "methods": {"dreambooth_lora": 2}, "trained_on": 1, "held_out": ["x"],
              "retriever": {"config": {"steps": 3}, "seconds": 1.0}, **pooled, "folds": runs}
    _write(tmp_path, report)
    table = (tmp_path / "retrieve-bench.md").read_text()
    assert "| weights only | new concepts | 0.375 | 1.000 | 8 |" in table
    assert "| 1 | emblem-1 | 0.500 | 1.000 | 0.500 | 1.000 |" in table


def test_scoring_on_a_tiny_library(tiny_dirs: dict, tmp_path: Path) -> None:
    """Three concepts, one held out: every eval phrasing is asked for, hits are counted per group, and the table is
    written."""
    pipe = cached_pipeline(str(tiny_dirs["sd1"]), "cpu")
    sources = [{"world_emblem": 7}, {"world_emblem": 11}, {"world_texture": "dots"}]
    planned = [Planned(f"t-{i}", "dreambooth_lora", f"trig{i}", s, held_out=i == 1) for i, s in enumerate(sources)]
    lib = Library()
    for i, p in enumerate(planned):
        add_random_adapter(pipe, p.name, seed=i + 1, trigger=p.trigger)
        entry = lib.get(p.name)
        lib.add(p.name, entry.state_dict(), entry.meta, train_config=p.source, overwrite=True)
    torch.manual_seed(0)
    info = train_retriever(lib, RetrieverConfig(steps=3), exclude=["t-1"], progress=False)
    assert info["trained_on"] == ["t-0", "t-2"]
    report = score(lib.root, planned, seeds=1)
    asked = len(queries(planned, 1))
    for mode in ("weights_only", "with_metadata"):
        groups = report[mode]
        assert groups["all"]["prompts"] == asked
        assert groups["held_out_concepts"]["prompts"] == groups["new_concepts"]["prompts"] == asked // 3
        assert all(0 <= g["top1"] <= g["top3"] <= 1 for k, g in groups.items() if k != "misses")
        assert all(m["wanted"] in {p.concept for p in planned} and len(m["got"]) == 3 for m in groups["misses"])
    assert report["weights_only"]["all"]["top3"] == 1.0  # three candidates: the top 3 is every adapter
    full = {"adapters": 3, "concepts": 3, "methods": {"dreambooth_lora": 3}, "trained_on": 2, "retriever": info,
            "held_out": ["t-1"], **report}
    _write(tmp_path, full)
    table = (tmp_path / "retrieve-bench.md").read_text()
    assert "| weights only | new concepts |" in table and "held out: t-1" in table
    assert json.loads((tmp_path / "retrieve-bench.json").read_text())["trained_on"] == 2
