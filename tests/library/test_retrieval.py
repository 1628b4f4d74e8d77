"""AutoLoRA retrieval on tiny synthetic libraries: random non-identity adapters, captions in their descriptions."""

from __future__ import annotations

import json

import pytest
import torch

from studio.errors import StudioError
from studio.library import AdapterMeta, Library
from studio.library.encoder import Layer, WeightEncoder, pad_factors, tower_features, words_only
from studio.library.retrieval import (
    FOLDER,
    INDEX_NAME,
    RetrieverConfig,
    adapter_factors,
    load_retriever,
    refresh_index,
    retrieve,
    train_retriever,
)


MODULES = {  # module -> (d_out, d_in): a linear, a 3x3 convolution (d_in = 4 * 3 * 3) and a text-encoder layer
    "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k": (16, 8),
    "unet.down_blocks.0.resnets.0.conv1": (4, 36),
    "text_encoder.encoder.layers.0.self_attn.q_proj": (8, 8),
}
CAPTIONS = {  # each adapter's description: what its card says and what a user would type
    "alpha": "a large red star",
    "beta": "a small blue ring",
    "gamma": "a green square on a black background",
    "delta": "a white heart on the left",
}


def _adapter(seed: int, rank: int = 2) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for module, (d_out, d_in) in MODULES.items():
        conv = "conv" in module
        sd[f"{module}.lora_A.weight"] = torch.randn(rank, 4, 3, 3, generator=g) if conv else \
            torch.randn(rank, d_in, generator=g)
        sd[f"{module}.lora_B.weight"] = torch.randn(d_out, rank, *((1, 1) if conv else ()), generator=g)
    return sd


def _add(library: Library, name: str, seed: int, description: str = "", rank: int = 2) -> None:
    sd = _adapter(seed, rank)
    ranks = dict.fromkeys(MODULES, rank)
    library.add(name, sd, AdapterMeta(ranks=ranks, alphas={m: float(rank) for m in MODULES},
                                      description=description, trigger_words=[f"zq{seed}"]))


@pytest.fixture(autouse=True)
def _one_thread(one_thread: None) -> None:
    pass


@pytest.fixture
def library(tmp_path) -> Library:
    lib = Library(tmp_path / "lib")
    for seed, (name, text) in enumerate(CAPTIONS.items()):
        _add(lib, name, seed, text)
    return lib


def test_encoder_reads_the_delta_not_its_factors() -> None:
    torch.manual_seed(0)
    layers = [Layer(m, *dims) for m, dims in MODULES.items()]
    encoder = WeightEncoder(layers, width=16, depth=1, heads=2).eval()
    g = torch.Generator().manual_seed(1)
    one = {m: (torch.randn(o, 2, generator=g), torch.randn(2, i, generator=g)) for m, (o, i) in MODULES.items()}
    mix = torch.tensor([[2.0, 1.0], [0.5, 3.0]])  # B A = (B M^-1)(M A): another factorisation of the same delta
    same = {m: (b @ torch.linalg.inv(mix), mix @ a) for m, (b, a) in one.items()}
    padded = {m: (torch.cat([b, torch.zeros(b.shape[0], 3)], 1), torch.cat([a, torch.randn(3, a.shape[1])]))
              for m, (b, a) in one.items()}  # rank 5 with zero columns of B: the same delta again
    other = {m: (torch.randn(o, 2, generator=g), torch.randn(2, i, generator=g)) for m, (o, i) in MODULES.items()}
    with torch.no_grad():
        e = encoder(*pad_factors([one, same, padded, other], layers))  # (4, 16)
    torch.testing.assert_close(e[1], e[0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(e[2], e[0], atol=1e-4, rtol=1e-4)
    assert (e[3] - e[0]).abs().max() > 1e-2


def test_encoder_ignores_layers_an_adapter_does_not_adapt() -> None:
    torch.manual_seed(0)
    layers = [Layer(m, *dims) for m, dims in MODULES.items()]
    encoder = WeightEncoder(layers, width=16, depth=1, heads=2).eval()
    g = torch.Generator().manual_seed(2)
    full = {m: (torch.randn(o, 2, generator=g), torch.randn(2, i, generator=g)) for m, (o, i) in MODULES.items()}
    first = dict(list(full.items())[:2])
    stacked, present = pad_factors([full, first], layers)
    assert present.tolist() == [[True, True, True], [True, True, False]]
    with torch.no_grad():
        e = encoder(stacked, present)
        alone = encoder(*pad_factors([first], layers[:2] + layers[2:]))
    torch.testing.assert_close(e[1], alone[0])  # the missing layer neither attends nor pools
    assert (e[0] - e[1]).abs().max() > 1e-3


def test_lokr_adapters_are_read_through_their_delta(tmp_path) -> None:
    lib = Library(tmp_path / "lib")
    module = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"
    g = torch.Generator().manual_seed(3)
    sd = {f"{module}.lokr_w1": torch.randn(4, 2, generator=g), f"{module}.lokr_w2": torch.randn(4, 4, generator=g)}
    lib.add("kron", sd, AdapterMeta(peft_type="LOKR", ranks={module: 4}, alphas={module: 2.0}))
    b, a = adapter_factors(lib.get("kron"))[module]
    torch.testing.assert_close(b @ a, torch.kron(sd[f"{module}.lokr_w1"], sd[f"{module}.lokr_w2"]) * 0.5,
                               atol=1e-4, rtol=1e-4)


def test_trained_retriever_finds_each_adapter_from_its_weights(library) -> None:
    info = train_retriever(library, RetrieverConfig(steps=40, lr=3e-3), progress=False)
    assert sorted(info["trained_on"]) == sorted(CAPTIONS)
    for name, text in CAPTIONS.items():
        found = retrieve(text, 2, weights_only=True, library=library)
        assert found[0].name == name, (text, found)
        assert found[0].metadata is None and found[0].score == found[0].weights
    both = retrieve("a large red star", 4, library=library)
    assert both[0].name == "alpha" and both[0].metadata is not None and len(both) == 4


def test_text_side_reads_words_alone_whatever_their_order(library) -> None:
    train_retriever(library, RetrieverConfig(steps=40, lr=3e-3, context_dropout=1.0), progress=False)
    retriever = load_retriever(library)
    assert retriever is not None
    pooled, states, mask, _ = tower_features(["a large red star", "star red large a"])
    alone = words_only(states)
    half = states.shape[-1] // 2
    assert alone[..., :half].abs().max() == 0 and torch.equal(alone[..., half:], states[..., half:])
    with torch.no_grad():
        read = retriever.head(pooled, alone, mask)
    torch.testing.assert_close(read[0], read[1])  # the same words in another order: one reading
    for name, text in CAPTIONS.items():  # trained on the words alone: a caption backwards still finds its adapter
        found = retrieve(" ".join(reversed(text.split())), 1, weights_only=True, library=library)
        assert found[0].name == name, (text, found)


def test_weights_signal_is_corrected_for_hubness(library) -> None:
    train_retriever(library, RetrieverConfig(steps=40, lr=3e-3), progress=False)
    retriever = load_retriever(library)  # the training captions' embeddings come back from disk
    assert retriever is not None and retriever.references is not None and len(retriever.references) >= len(CAPTIONS)
    index = refresh_index(library, retriever)
    prompt = "a small blue ring"
    found = retrieve(prompt, 4, weights_only=True, library=library)
    e = torch.tensor([index[f.name]["weights"] for f in found])  # (4, D)
    cos = e @ retriever.embed_texts([prompt])[0]
    near = (retriever.references @ e.T).topk(min(10, len(retriever.references)), 0).values.mean(0)  # r(e) (4,)
    torch.testing.assert_close(torch.tensor([f.weights for f in found]), 2 * cos - near, atol=1e-3, rtol=0)
    assert near.abs().max() > 0.05  # the correction is not nothing
    retriever.references = None  # a retriever from before: the plain cosine, doubled
    torch.testing.assert_close(retriever.hubness(e), torch.zeros(4))
    from safetensors.torch import load_file, save_file

    model = library.root / FOLDER / "retriever.safetensors"
    state = load_file(str(model))
    save_file({**state, "references": state["references"][:, :3].contiguous()}, str(model))
    with pytest.raises(StudioError, match="damaged"):
        load_retriever(library)


def test_index_follows_adds_removes_and_changes(library) -> None:
    train_retriever(library, RetrieverConfig(steps=2), progress=False)
    path = library.root / FOLDER / INDEX_NAME
    first = refresh_index(library)
    assert sorted(first) == sorted(CAPTIONS) and path.is_file()
    retriever = load_retriever(library)
    assert retriever is not None
    _add(library, "epsilon", 9, "a black cross")
    second = refresh_index(library)
    assert "epsilon" in second and second["alpha"] == first["alpha"]  # only the new adapter was embedded
    expected = retriever.embed_adapters([adapter_factors(library.get("epsilon"))])[0]
    torch.testing.assert_close(torch.tensor(second["epsilon"]["weights"]), expected, atol=1e-5, rtol=1e-5)
    library.remove("beta")
    assert "beta" not in refresh_index(library)
    assert "beta" not in json.loads(path.read_text())["adapters"]
    library.remove("alpha")  # the same name again, with new weights: re-embedded
    _add(library, "alpha", 11, "a large red star")
    assert refresh_index(library)["alpha"]["weights"] != first["alpha"]["weights"]


def test_retrieval_without_a_retriever(library) -> None:
    with pytest.raises(StudioError, match="studio retrieve --train"):
        retrieve("a red star", weights_only=True, library=library)
    found = retrieve("a small blue ring", 1, library=library)  # metadata alone
    assert found[0].weights is None and found[0].metadata is not None
    with pytest.raises(StudioError, match="prompt"):
        retrieve("  ", library=library)
    with pytest.raises(StudioError, match="at least 2"):
        train_retriever(Library(library.root.parent / "empty"), progress=False)
    with pytest.raises(StudioError, match="no adapters to retrieve: train one"):
        retrieve("a red star", library=Library(library.root.parent / "empty"))


def test_cli_trains_ranks_and_refuses_bad_input(capsys) -> None:
    from studio.cli import main

    lib = Library()  # $STUDIO_LIBRARY: a fresh folder per test
    for seed, (name, text) in enumerate(CAPTIONS.items()):
        _add(lib, name, seed, text)
    assert main(["retrieve", "a red star", "--weights-only"]) == 2
    assert "studio retrieve --train" in capsys.readouterr().err
    assert main(["retrieve", "--train", "--train-steps", "40", "--exclude", "delta"]) == 0
    assert "trained on 3 adapters" in capsys.readouterr().out
    assert main(["retrieve", "a small blue ring", "--k", "4", "--weights-only", "--json"]) == 0
    found = json.loads(capsys.readouterr().out)
    ranked = [f["name"] for f in found if f["name"] != "delta"]  # delta, left out of training, is ranked too
    assert ranked[0] == "beta" and len(found) == 4 and found[0]["metadata"] is None
    assert {f["name"]: f["learned"] for f in found} == {"alpha": True, "beta": True, "gamma": True, "delta": False}
    assert main(["retrieve", "a small blue ring", "--k", "1"]) == 0
    assert capsys.readouterr().out.startswith("1. beta  score")
    assert main(["retrieve", "a small blue ring", "--k", "4"]) == 0  # delta, unseen, is flagged with what to do
    out = capsys.readouterr().out
    assert "delta  score" in out and "[new to the retriever]" in out.split("delta  score")[1].splitlines()[0]
    assert "studio retrieve --train` learns them" in out and out.count("[new to the retriever]") == 1
    assert main(["retrieve", "a red star", "--k", "0"]) == 2
    assert "--k must be at least 1" in capsys.readouterr().err
    assert main(["retrieve"]) == 2


def test_metadata_signal_prefers_bound_words() -> None:
    from studio.library.lexical import tfidf_scores

    cards = ["a purple ring with a red star inside", "a red ring with a purple star inside", "polka dots", ""]
    scores = tfidf_scores("purple ring, red star", cards)
    assert scores[0] > scores[1] > 0 and scores[2] == 0.0 and scores[3] == 0.0
