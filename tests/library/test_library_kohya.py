"""kohya <-> library bit-exact round trips (SD1, SDXL, every module kind) and parity with diffusers' own loader."""

from __future__ import annotations

import hashlib
import struct

import numpy as np
import pytest
import torch
from library_helpers import make_kohya, targets
from safetensors import safe_open
from safetensors.torch import load_file
from tiny_models import BUILDERS

from studio.library import Library, export_adapter, import_adapter, load_adapters, unload_adapters
from studio.library.formats.keys import ldm_to_unet, unet_to_ldm
from studio.library.formats.kohya import read_kohya


@pytest.fixture(scope="module")
def pipes() -> dict:
    return {kind: BUILDERS[kind]() for kind in ("sd1", "sdxl")}


def test_ldm_names_match_sd_scripts() -> None:
    # Real SDXL (2 layers per block), as in sd-scripts files; and the tiny SDXL (1 layer per block).
    assert unet_to_ldm("down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q", 2) == (
        "input_blocks.4.1.transformer_blocks.0.attn1.to_q"
    )
    assert unet_to_ldm("down_blocks.0.downsamplers.0.conv", 2) == "input_blocks.3.0.op"
    assert unet_to_ldm("up_blocks.0.upsamplers.0.conv", 2) == "output_blocks.2.2.conv"
    assert unet_to_ldm("mid_block.resnets.1.conv1", 2) == "middle_block.2.in_layers.2"
    assert unet_to_ldm("down_blocks.1.resnets.0.time_emb_proj", 1) == "input_blocks.3.0.emb_layers.1"
    assert unet_to_ldm("up_blocks.1.attentions.1.proj_out", 1) == "output_blocks.3.1.proj_out"
    for module in ("down_blocks.2.resnets.1.conv_shortcut", "up_blocks.0.resnets.2.conv2", "conv_in", "conv_out"):
        assert ldm_to_unet(unet_to_ldm(module, 2), 2) == module


@pytest.mark.parametrize("kind", ["sd1", "sdxl"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_kohya_round_trip_is_bit_exact(pipes, tmp_path, kind: str, dtype: torch.dtype) -> None:
    pipe = pipes[kind]
    src = tmp_path / "in.safetensors"
    metadata = {
        "ss_output_name": "thing",
        "ss_network_dim": "4",
        "ss_tag_frequency": '{"a": {"x": 1}}',
        "modelspec.title": "Thing",
        "modelspec.trigger_phrase": "sks, thing",
        "other_key": "dropped",
    }
    original = make_kohya(pipe, src, kind, dtype=dtype, metadata=metadata)
    entry = import_adapter(src, name="thing", pipe=pipe)
    assert entry.meta.trigger_words == ["sks", "thing"]
    assert {m.split(".", 1)[0] for m in entry.modules} == {c for c, _ in targets(kind)}
    out = export_adapter("thing", "kohya", tmp_path / "out.safetensors")
    back = load_file(out)
    assert set(back) == set(original)
    for key, tensor in original.items():
        assert back[key].dtype == tensor.dtype, key
        assert torch.equal(back[key], tensor), key
    with safe_open(str(out), framework="pt") as f:
        written = f.metadata()
    for key in ("ss_output_name", "ss_network_dim", "ss_tag_frequency", "modelspec.title", "modelspec.trigger_phrase"):
        assert written[key] == metadata[key]
    blob = out.read_bytes()
    (n,) = struct.unpack("<Q", blob[:8])
    assert written["sshs_model_hash"] == hashlib.sha256(blob[8 + n :]).hexdigest()
    # Without the base, rule-based naming gives the same canonical modules.
    lpb = pipe.unet.config.layers_per_block
    assert read_kohya(src, layers_per_block=lpb).state_dict.keys() == entry.state_dict().keys()


def _image(pipe) -> np.ndarray:
    kwargs = {
        "prompt": "a red star",
        "num_inference_steps": 2,
        "height": 32,
        "width": 32,
        "output_type": "np",
        "generator": torch.Generator().manual_seed(0),
    }
    return pipe(**kwargs).images[0]


@pytest.mark.parametrize("kind", ["sd1", "sdxl"])
def test_exported_kohya_matches_diffusers_loader(tmp_path, kind: str) -> None:
    theirs, ours = BUILDERS[kind](), BUILDERS[kind]()
    src = tmp_path / "in.safetensors"
    # One alpha (not the rank) for all modules: diffusers 0.42 drops per-module alphas of attention-processor and
    # text-encoder keys (its `_get_alpha_name` builds alpha_pattern keys that match no module).
    make_kohya(ours, src, kind, seed=1, alpha=3.0)
    import_adapter(src, name="parity", pipe=ours)
    exported = export_adapter("parity", "kohya", tmp_path / "export.safetensors")
    base = _image(ours)

    theirs.load_lora_weights(str(exported), adapter_name="parity")
    theirs.set_adapters(["parity"], [0.7])
    load_adapters(ours, ["parity"], [0.7])
    a, b = _image(theirs), _image(ours)
    assert np.abs(a - b).max() < 1e-5
    assert np.abs(b - base).max() > 1e-3  # the adapter is not the identity

    unload_adapters(ours)
    assert np.abs(_image(ours) - base).max() == 0.0
    assert not any("lora" in n for n, _ in ours.unet.named_modules())


def test_unload_restores_text_encoder_and_unet_exactly(pipes, tmp_path) -> None:
    pipe = BUILDERS["sd1"]()
    make_kohya(pipe, tmp_path / "a.safetensors", "sd1", seed=2)
    make_kohya(pipe, tmp_path / "b.safetensors", "sd1", seed=3)
    import_adapter(tmp_path / "a.safetensors", name="a")
    import_adapter(tmp_path / "b.safetensors", name="b")
    ids = torch.tensor([[49406, 320, 1000, 49407] + [49407] * 73])
    sample, t, ctx = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0)), 10, None
    with torch.no_grad():
        te0 = pipe.text_encoder(ids)[0]
        ctx = te0
        unet0 = pipe.unet(sample, t, ctx).sample
        load_adapters(pipe, ["a", "b"], [0.5, -0.3])
        assert (pipe.text_encoder(ids)[0] - te0).abs().max() > 0
        assert (pipe.unet(sample, t, ctx).sample - unet0).abs().max() > 0
        unload_adapters(pipe, ["a"])
        assert (pipe.unet(sample, t, ctx).sample - unet0).abs().max() > 0
        unload_adapters(pipe)
        assert (pipe.text_encoder(ids)[0] - te0).abs().max() == 0
        assert (pipe.unet(sample, t, ctx).sample - unet0).abs().max() == 0
    assert Library().get("a").meta.base.family == "unknown"  # imported without a base: checked at load
