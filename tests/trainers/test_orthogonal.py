"""Orthogonal adaptation: frozen basis rows, library-allocated disjoint columns, interference-free merge by sum."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from trainer_helpers import quick

from studio.errors import StudioError
from studio.library import Library, delta_weight
from studio.library.meta import is_embedding
from studio.library.tools import merge
from trainers import OrthogonalConfig, train
from trainers.methods.orthogonal import orthogonal_basis


def test_the_basis_is_orthogonal_and_the_same_for_every_caller() -> None:
    basis = orthogonal_basis(96, 0)
    torch.testing.assert_close(basis.T @ basis, torch.eye(96), atol=1e-5, rtol=0)
    orthogonal_basis.cache_clear()
    assert torch.equal(orthogonal_basis(96, 0), basis) and not torch.allclose(orthogonal_basis(96, 1), basis)


TRIGGERS = {"orth-a": "sks", "orth-b": "zwx", "orth-c": "qrv", "orth-clash": "vbh", "orth-seed": "plk"}


def _orthogonal(name: str, model: Path, trigger: str | None = None, **method: object) -> object:
    config = OrthogonalConfig(**{"rank": 4, "lr": 5e-2, "train_text_encoder": True, **method})
    trigger = trigger or TRIGGERS.get(name, "sks")
    return train(config, quick(name=name, model=str(model), train_steps=3, lr=None, trigger=trigger))


def test_two_concepts_get_disjoint_columns_and_merge_by_a_plain_sum(tiny_dirs: dict) -> None:
    first, second = _orthogonal("orth-a", tiny_dirs["sd1"]), _orthogonal("orth-b", tiny_dirs["sd1"])
    a, b = first.entry, second.entry
    assert (a.meta.method_config["first_column"], b.meta.method_config["first_column"]) == (0, 4)
    assert "independent implementation" in a.card and "columns 4-7" in b.card
    sa, sb = a.state_dict(), b.state_dict()
    for module in [m for m in a.modules if not is_embedding(m)]:
        down_a, down_b = sa[f"{module}.lora_A.weight"].flatten(1), sb[f"{module}.lora_A.weight"].flatten(1)
        basis = orthogonal_basis(down_a.shape[1], 0)
        torch.testing.assert_close(down_a, basis[:, 0:4].T)  # frozen: exactly the allocated basis rows
        torch.testing.assert_close(down_a @ down_b.T, torch.zeros(4, 4), atol=1e-5, rtol=0)
    assert any(sa[f"{m}.lora_B.weight"].abs().max() > 0 for m in a.modules if not is_embedding(m))  # up factors

    merged = merge([("orth-a", 1.0), ("orth-b", 1.0)], "orth-ab")
    assert merged.meta.method == "orthogonal" and merged.meta.method_config["columns"] == [[0, 4], [4, 8]]
    sm = merged.state_dict()
    for module in a.modules:
        da, db = delta_weight(a.meta, sa, module), delta_weight(b.meta, sb, module)
        torch.testing.assert_close(delta_weight(merged.meta, sm, module), da + db, atol=1e-6, rtol=1e-5)
        # no crosstalk: b's residual is zero on a's input subspace, so the sum acts on a's inputs as a alone does
        rows_a = sa[f"{module}.lora_A.weight"].flatten(1)  # (r, d_in): basis rows, or one-hot trigger tokens
        torch.testing.assert_close(db @ rows_a.T, torch.zeros(db.shape[0], len(rows_a)), atol=1e-5, rtol=0)

    third = _orthogonal("orth-c", tiny_dirs["sd1"])
    assert third.entry.meta.method_config["first_column"] == 8  # the merge's columns are taken too
    clash = _orthogonal("orth-clash", tiny_dirs["sd1"], first_column=2)
    assert clash.entry.meta.method_config["first_column"] == 2
    with pytest.raises(StudioError, match="'orth-clash' and 'orth-a' share basis columns 2-3"):
        merge([("orth-a", 1.0), ("orth-clash", 1.0)], "bad")
    _orthogonal("orth-seed", tiny_dirs["sd1"], basis_seed=5)
    with pytest.raises(StudioError, match="different bases"):
        merge([("orth-a", 1.0), ("orth-seed", 1.0)], "bad")
    twin = _orthogonal("orth-twin", tiny_dirs["sd1"], trigger="zwx")  # orth-b's trigger: the same table rows
    with pytest.raises(StudioError, match="'orth-twin' and 'orth-b' both train token .* same trigger word"):
        merge([("orth-b", 1.0), ("orth-twin", 1.0)], "bad")
    assert twin.entry.meta.method_config["first_column"] == 12
    assert "bad" not in Library()


def test_the_trigger_rows_move_only_the_triggers_tokens_and_load_and_unload_exactly(tiny_dirs: dict) -> None:
    from diffusers import StableDiffusionPipeline

    from studio.library import load_adapters, unload_adapters
    from studio.library.tools import export_adapter

    result = _orthogonal("orth-a", tiny_dirs["sd1"], trigger="sks", train_text_encoder=False)
    entry = result.entry
    text = [m for m in entry.modules if m.startswith("text_encoder")]
    assert entry.meta.method_config["trigger"] == "sks" and len(text) == 1 and is_embedding(text[0])  # rows only
    table = text[0]
    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_dirs["sd1"]))
    ids = pipe.tokenizer("sks", add_special_tokens=False).input_ids
    before = pipe.text_encoder.get_input_embeddings().weight.detach().clone()
    sd = entry.state_dict()
    down, up = sd[f"{table}.lora_A.weight"], sd[f"{table}.lora_B.weight"]  # (r, vocab), (dim, r)
    assert down.shape == (len(ids), len(before)) and torch.equal(down.nonzero()[:, 1], torch.tensor(ids))
    assert up.abs().min() > 0  # every row trained
    tokens = torch.tensor([[ids[0], 320, 1929]])  # the trigger, then two other words
    load_adapters(pipe, ["orth-a"], [0.5])
    moved = pipe.text_encoder.get_input_embeddings()(tokens)[0] - before[tokens[0]]  # (3, dim)
    torch.testing.assert_close(moved[0], 0.5 * up[:, 0], atol=1e-6, rtol=1e-5)  # the row moved by B, at the weight
    assert torch.equal(moved[1:], torch.zeros_like(moved[1:]))  # every other token exact
    unload_adapters(pipe)
    assert torch.equal(pipe.text_encoder.get_input_embeddings()(tokens)[0], before[tokens[0]])
    with pytest.raises(StudioError, match="token-table rows .* --format peft"):
        export_adapter("orth-a", "kohya", tiny_dirs["sd1"].parent / "a.safetensors")
    folder = export_adapter("orth-a", "peft", tiny_dirs["sd1"].parent / "peft-a")
    from studio.library.tools import import_adapter

    back = import_adapter(folder, name="orth-a-back").state_dict()
    assert torch.equal(back[f"{table}.lora_B.weight"], up) and torch.equal(back[f"{table}.lora_A.weight"], down)


def test_a_resumed_run_keeps_its_columns_and_a_full_basis_is_refused(tiny_dirs: dict) -> None:
    config = OrthogonalConfig(rank=4)
    cancelled = train(config, quick(name="orth-r", model=str(tiny_dirs["sd1"]), train_steps=3),
                      cancel=lambda: True)
    assert cancelled.status == "cancelled"
    _orthogonal("orth-other", tiny_dirs["sd1"])  # takes the next free block, not the unfinished run's
    resumed = train(config, quick(name="orth-r", model=str(tiny_dirs["sd1"]), train_steps=3, resume="latest"))
    assert resumed.entry.meta.method_config["first_column"] == 0
    assert Library().get("orth-other").meta.method_config["first_column"] == 4
    with pytest.raises(StudioError, match="inputs: its basis holds"):
        _orthogonal("orth-full", tiny_dirs["sd1"], first_column=10_000)
