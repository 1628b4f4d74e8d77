"""A writer killed between its steps never costs the library an entry: the old folder of a half-done overwrite comes
back, a stale index is rebuilt from the folders, and `reindex` removes what killed writers left."""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch

from studio.library import Library
from studio.library.meta import AdapterMeta


MODULE = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"


def _add(lib: Library, name: str, seed: int) -> torch.Tensor:
    a = torch.randn(4, 32, generator=torch.Generator().manual_seed(seed))
    lib.add(name, {f"{MODULE}.lora_A.weight": a, f"{MODULE}.lora_B.weight": torch.randn(32, 4)},
            AdapterMeta(ranks={MODULE: 4}, alphas={MODULE: 4.0}), overwrite=True)
    return a


def test_an_overwrite_killed_between_its_renames_gets_the_old_folder_back(tmp_path: Path) -> None:
    lib = Library(tmp_path)
    old = _add(lib, "a", 0)
    _add(lib, "b", 1)
    os.rename(tmp_path / "a", tmp_path / ".trash-a-0123abcd")  # killed here: the new folder never arrived
    (tmp_path / ".staging-a-deadbeef").mkdir()
    entries = Library(tmp_path).list()
    assert [e.name for e in entries] == ["a", "b"]
    assert torch.equal(entries[0].state_dict()[f"{MODULE}.lora_A.weight"], old)
    index_names = [line.split('"name": "')[1].split('"')[0] for line in (tmp_path / "index.jsonl").read_text()
                   .splitlines()]
    assert index_names == ["a", "b"]


def test_a_stale_index_is_rebuilt_and_reindex_clears_leftovers(tmp_path: Path) -> None:
    lib = Library(tmp_path)
    _add(lib, "a", 0)
    index = (tmp_path / "index.jsonl").read_text()
    _add(lib, "b", 1)
    (tmp_path / "index.jsonl").write_text(index)  # killed after b's rename, before its index write
    (tmp_path / "a" / "adapter_model.safetensors").touch()  # and a's weights changed after the index was written
    assert [e.name for e in Library(tmp_path).list()] == ["a", "b"]
    assert (tmp_path / "index.jsonl").read_text().count("\n") == 2
    for leftover in (".staging-c-00000000", ".removed-d-11111111", ".trash-a-22222222"):
        (tmp_path / leftover).mkdir()
    fresh = tmp_path / ".staging-e-33333333"  # a live writer's staging: too young to remove
    fresh.mkdir()
    old = time.time() - 7200
    os.utime(tmp_path / ".staging-c-00000000", (old, old))
    assert Library(tmp_path).reindex() == {}
    assert sorted(p.name for p in tmp_path.iterdir()) == [".lock", ".staging-e-33333333", "a", "b", "index.jsonl"]
