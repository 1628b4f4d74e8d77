"""Retrieval in the page: the Library tab's search by description and the Compose tab's compose by prompt."""

from __future__ import annotations

from pathlib import Path

import pytest
from composer_helpers import add_random_adapter

from studio.errors import StudioError
from studio.generate import cached_pipeline
from studio.library import Library, edit
from studio.pnginfo import read_parameters
from studio.ui.compose_tab import run_compose_by_prompt
from studio.ui.library_tab import retrieve_view


@pytest.fixture()
def described(tiny_dirs: dict) -> str:
    pipe = cached_pipeline(str(tiny_dirs["sd1"]), "cpu")
    for seed, (name, text) in enumerate((("alpha", "a red star with stripes"), ("beta", "a blue ring"),
                                         ("gamma", "a green square")), 1):
        add_random_adapter(pipe, name, seed=seed)
        edit(name, description=text)
    return str(tiny_dirs["sd1"])


def test_library_search_by_description_ranks_by_metadata_without_a_retriever(described: str) -> None:
    rows = retrieve_view("a blue ring", k=2)
    assert [r[0] for r in rows] == [1, 2] and rows[0][1] == "beta" and rows[0][3] == ""  # no weight score yet
    assert rows[0][5] == ""  # nor a retriever that could have learned it
    with pytest.raises(StudioError, match="studio retrieve --train"):
        retrieve_view("a blue ring", weights_only=True)


def test_compose_by_prompt_shows_what_it_retrieved(described: str, tmp_path: Path) -> None:
    fields = {"model": described, "prompt": "a red star with stripes", "seed": 1, "steps": 2, "adapters": "beta"}
    paths, text, found = run_compose_by_prompt(fields, out_dir=tmp_path)
    params = read_parameters(paths[0])
    assert found.splitlines()[0].startswith("1. alpha  score")
    assert params["composer"] == "autolora" and params["adapters"][0]["name"] == "alpha"  # the field is ignored
    assert params["prompt"].startswith("a red star with stripes")
    assert len(Library().list()) == 3


def test_the_library_tab_trains_the_retriever_and_search_then_reads_the_weights(described: str) -> None:
    from studio.ui.library_tab import train_retriever_view

    text = train_retriever_view(steps=5)
    assert text.startswith("retriever trained on 3 adapters in ")
    rows = retrieve_view("a blue ring", weights_only=True)
    assert len(rows) == 3 and all(isinstance(r[3], float) and r[4] == "" for r in rows)  # weights, no metadata
    assert all(r[5] == "yes" for r in rows)
    pipe = cached_pipeline(described, "cpu")
    add_random_adapter(pipe, "delta", seed=9)  # added after training: flagged with what to do
    assert {r[1]: r[5] for r in retrieve_view("a blue ring", weights_only=True, k=4)}["delta"] == \
        "no, train the retriever"
    with pytest.raises(StudioError, match="at least 2"):
        for name in ("alpha", "beta", "delta"):
            Library().remove(name)
        train_retriever_view(steps=5)
