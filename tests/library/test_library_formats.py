"""native <-> diffusers / PEFT / LyCORIS round trips, LoKr parity with PEFT, diffusers reading the canonical folder."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from library_helpers import make_kohya, make_lycoris
from peft import LoraConfig
from peft.tuners.lokr.layer import LoKrLayer
from safetensors.torch import load_file
from tiny_models import BUILDERS

from studio.errors import StudioError
from studio.library import Library, delta_weight, export_adapter, import_adapter, load_adapters, unload_adapters


@pytest.fixture(scope="module")
def sd1():
    return BUILDERS["sd1"]()


def _same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key


@pytest.mark.parametrize("fmt", ["diffusers", "peft"])
def test_native_round_trip_is_exact(sd1, tmp_path, fmt: str) -> None:
    make_kohya(sd1, tmp_path / "k.safetensors", "sd1", seed=4)
    entry = import_adapter(tmp_path / "k.safetensors", name="native", pipe=sd1)
    out = export_adapter("native", fmt, tmp_path / fmt)
    back = import_adapter(out, name="back")
    _same(entry.state_dict(), back.state_dict())
    assert back.meta.alphas == entry.meta.alphas and back.meta.ranks == entry.meta.ranks


def test_canonical_folder_is_read_by_diffusers_and_peft(tmp_path) -> None:
    theirs, ours = BUILDERS["sd1"](), BUILDERS["sd1"]()
    make_kohya(ours, tmp_path / "k.safetensors", "sd1", seed=5, alpha=2.0)
    entry = import_adapter(tmp_path / "k.safetensors", name="canon", pipe=ours)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a plain PEFT config: PEFT reads it without an unknown-key warning
        LoraConfig.from_pretrained(str(entry.folder))
    theirs.load_lora_weights(str(entry.folder), weight_name="adapter_model.safetensors", adapter_name="canon")
    load_adapters(ours, ["canon"])
    ids = torch.tensor([[49406, 320, 1000] + [49407] * 74])
    x = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ctx_a, ctx_b = theirs.text_encoder(ids)[0], ours.text_encoder(ids)[0]
        assert (ctx_a - ctx_b).abs().max() < 1e-6
        assert (theirs.unet(x, 10, ctx_a).sample - ours.unet(x, 10, ctx_a).sample).abs().max() < 1e-5


def test_lycoris_lokr_imports_exactly_and_matches_peft(tmp_path) -> None:
    pipe = BUILDERS["sd1"]()
    src = tmp_path / "lokr.safetensors"
    expect = make_lycoris(pipe, src)
    entry = import_adapter(src, name="kron", pipe=pipe)
    assert entry.meta.peft_type == "LOKR"
    # LyCORIS -> library -> LyCORIS is bit exact, alpha included.
    out = export_adapter("kron", "lycoris", tmp_path / "out.safetensors")
    original, back = load_file(src), load_file(out)
    _same(original, back)
    # PEFT's LoKr layer rebuilds LyCORIS's delta within 1e-6.
    base = {m: pipe.unet.get_submodule(m).weight.detach().clone() for m in expect}
    load_adapters(pipe, ["kron"], [1.0])
    worst = 0.0
    for module, (w1, w2, scale) in expect.items():
        layer = pipe.unet.get_submodule(module)
        assert isinstance(layer, LoKrLayer)
        if w2.dim() == 4:
            w1 = w1[:, :, None, None]
        ref = torch.kron(w1, w2) * scale
        got = layer.get_delta_weight("kron").double()
        worst = max(worst, float((got - ref.reshape(got.shape)).abs().max()))
        ours = delta_weight(entry.meta, entry.state_dict(), f"unet.{module}").double()
        worst = max(worst, float((ours - ref.reshape(ref.shape[0], -1)).abs().max()))
    assert worst < 1e-6
    # PEFT folders round-trip LoKr exactly as well.
    peft_dir = export_adapter("kron", "peft", tmp_path / "peft")
    _same(entry.state_dict(), import_adapter(peft_dir, name="kron-peft").state_dict())
    unload_adapters(pipe)
    for module, weight in base.items():
        assert torch.equal(pipe.unet.get_submodule(module).weight, weight)


def test_lokr_weights_and_mixed_type_refusal(tmp_path) -> None:
    pipe = BUILDERS["sd1"]()
    make_lycoris(pipe, tmp_path / "lokr.safetensors")
    make_kohya(pipe, tmp_path / "k.safetensors", "sd1", seed=8)
    import_adapter(tmp_path / "lokr.safetensors", name="kron")
    import_adapter(tmp_path / "k.safetensors", name="lora")
    x = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    ctx = torch.randn(1, 77, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        base = pipe.unet(x, 10, ctx).sample
        load_adapters(pipe, ["kron"], [0.0])
        assert (pipe.unet(x, 10, ctx).sample - base).abs().max() == 0
        load_adapters(pipe, ["kron"], [0.5])
        half = pipe.unet(x, 10, ctx).sample
        assert (half - base).abs().max() > 1e-4
        with pytest.raises(StudioError, match="cannot stack a LORA adapter on unet"):
            load_adapters(pipe, ["lora"])
        unload_adapters(pipe)
        assert (pipe.unet(x, 10, ctx).sample - base).abs().max() == 0
    assert np.isfinite(half.numpy()).all()
    assert Library().get("kron").meta.lokr["decompose_both"] is True


def test_a_folder_with_the_studio_fields_inside_adapter_config_still_reads(tmp_path) -> None:
    """Folders written before studio.json kept the studio's fields under a "studio" key of adapter_config.json."""
    import json

    from studio.library import Library

    sd1 = BUILDERS["sd1"]()
    make_kohya(sd1, tmp_path / "k.safetensors", "sd1", seed=6, alpha=3.0)
    entry = import_adapter(tmp_path / "k.safetensors", name="older", pipe=sd1)
    studio = json.loads((entry.folder / "studio.json").read_text())
    config = json.loads((entry.folder / "adapter_config.json").read_text())
    assert "studio" not in config and studio["components"]
    (entry.folder / "studio.json").unlink()
    (entry.folder / "adapter_config.json").write_text(json.dumps({**config, "studio": studio}))
    back = Library().get("older")
    _same(entry.state_dict(), back.state_dict())
    assert back.meta.alphas == entry.meta.alphas and back.meta.ranks == entry.meta.ranks


def test_token_table_keys_translate_to_peft_and_back_and_other_embeddings_stay_refused() -> None:
    from studio.library.meta import canonical_key, peft_key

    table = "text_encoder.text_model.embeddings.token_embedding"
    for param, peft_param in (("lora_A.weight", "lora_embedding_A"), ("lora_B.weight", "lora_embedding_B")):
        assert peft_key(f"{table}.{param}") == f"{table}.{peft_param}"
        assert canonical_key(f"{table}.{peft_param}") == f"{table}.{param}"
    linear = "unet.down_blocks.0.attentions.0.proj_in.lora_A.weight"
    assert peft_key(linear) == linear == canonical_key(linear)
    other = "text_model.embed_tokens.lora_embedding_A"  # not a table the studio knows: left for the reader to refuse
    assert canonical_key(other) == other
