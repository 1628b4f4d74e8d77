"""Original-layout single-file checkpoints: export, detection, loading, errors, and real-size key maps on `meta`."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint
from safetensors.torch import load_file, save_file
from tiny_models import BUILDERS, KINDS
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from studio.errors import StudioError
from studio.models import ldm_keys as K
from studio.models.ldm_keys import infer_text_config, infer_unet_config, infer_vae_config
from studio.models.single_file import _export, detect_family, load_single_file, save_single_file, shipped_config


COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2")


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    """Tiny models gain nothing from threads, and on a busy 2-core machine two threads can run 100x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[object, Path]]:
    """Each tiny pipeline and its original-layout export, built once for the module."""
    root = tmp_path_factory.mktemp("single_file")
    out = {}
    for kind in KINDS:
        pipe = BUILDERS[kind]()
        out[kind] = (pipe, save_single_file(pipe, root / f"{kind}.safetensors"))
    return out


def _assert_same_weights(a: object, b: object) -> None:
    for name in COMPONENTS:
        if getattr(a, name, None) is None:
            continue
        sa, sb = getattr(a, name).state_dict(), getattr(b, name).state_dict()
        assert sa.keys() == sb.keys(), f"{name}: {sorted(set(sa) ^ set(sb))[:3]}"
        for key in sa:
            assert torch.equal(sa[key], sb[key]), f"{name}.{key} differs"


def _image(pipe: object) -> np.ndarray:
    kwargs = {"num_inference_steps": 2, "output_type": "np", "height": 32, "width": 32}
    return pipe("a large red star on the left", generator=torch.Generator().manual_seed(0), **kwargs).images


@pytest.mark.parametrize("kind", KINDS)
def test_round_trip_is_exact(kind: str, exported: dict) -> None:
    pipe, path = exported[kind]
    assert detect_family(list(load_file(path))) == kind
    back = load_single_file(path)
    assert type(back) is type(pipe)
    _assert_same_weights(pipe, back)
    for name in ("unet", "vae"):
        want, got = dict(getattr(pipe, name).config), dict(getattr(back, name).config)
        assert {k: got[k] for k in want if not k.startswith("_")} == {
            k: list(v) if isinstance(v, tuple) else v for k, v in want.items() if not k.startswith("_")
        }
    assert type(back.scheduler) is type(pipe.scheduler)
    assert back.scheduler.config.prediction_type == pipe.scheduler.config.prediction_type
    pipe.set_progress_bar_config(disable=True)
    back.set_progress_bar_config(disable=True)
    np.testing.assert_array_equal(_image(pipe), _image(back))


@pytest.mark.parametrize("kind", KINDS)
def test_foreign_file_without_studio_header_loads_from_shapes(kind: str, exported: dict, tmp_path: Path) -> None:
    pipe, path = exported[kind]
    bare = tmp_path / "bare.safetensors"
    save_file(load_file(path), str(bare))  # what A1111 / civitai files look like: no studio header
    back = load_single_file(bare)
    _assert_same_weights(pipe, back)
    expected = {"sd1": "epsilon", "sd2": "v_prediction", "sdxl": "epsilon"}[kind]
    assert back.scheduler.config.prediction_type == expected  # the shipped config's
    assert load_single_file(bare, prediction_type="epsilon").scheduler.config.prediction_type == "epsilon"


def test_sd2_full_openclip_tower_drops_the_unused_last_block(exported: dict, tmp_path: Path) -> None:
    pipe, path = exported["sd2"]
    state = load_file(path)
    tower = [k for k in state if k.startswith("cond_stage_model.model.transformer.resblocks.2.")]
    for key in tower:  # original SD2 files carry all 24 OpenCLIP blocks plus the projection; SD2 reads block 23
        state[key.replace("resblocks.2.", "resblocks.3.")] = torch.randn_like(state[key])
    state["cond_stage_model.model.text_projection"] = torch.randn(32, 32)
    state["cond_stage_model.model.logit_scale"] = torch.tensor(4.6)
    save_file(state, str(tmp_path / "full.safetensors"))
    back = load_single_file(tmp_path / "full.safetensors")
    assert back.text_encoder.config.num_hidden_layers == 3
    _assert_same_weights(pipe, back)


def test_damaged_file_names_it_and_says_what_to_do(exported: dict, tmp_path: Path) -> None:
    data = exported["sd1"][1].read_bytes()
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(data[: len(data) // 2])
    with pytest.raises(StudioError, match=r"broken\.safetensors is damaged or incomplete.*re-download or re-export"):
        load_single_file(broken)


def test_files_that_are_not_sd_checkpoints(exported: dict, tmp_path: Path) -> None:
    random_keys = tmp_path / "random.safetensors"
    save_file({"foo.weight": torch.randn(3, 3), "bar": torch.zeros(2)}, str(random_keys))
    with pytest.raises(StudioError, match="not an original-layout SD checkpoint"):
        load_single_file(random_keys)
    lora = tmp_path / "lora.safetensors"
    save_file({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 8)}, str(lora))
    with pytest.raises(StudioError, match="LoRA adapter"):
        load_single_file(lora)
    with pytest.raises(StudioError, match="not a .safetensors file"):
        load_single_file(tmp_path / "model.ckpt")


def test_incomplete_and_foreign_weights_name_the_first_key(exported: dict, tmp_path: Path) -> None:
    state = load_file(exported["sd1"][1])
    no_vae_attn = {k: v for k, v in state.items() if "first_stage_model.decoder.mid.attn_1.q." not in k}
    save_file(no_vae_attn, str(tmp_path / "a.safetensors"))
    with pytest.raises(StudioError, match=r"lacks 2 VAE weights, first 'first_stage_model\.decoder\.mid\.attn_1\.q"):
        load_single_file(tmp_path / "a.safetensors")
    extra = {**state, "model.diffusion_model.input_blocks.1.9.weight": torch.zeros(1)}
    save_file(extra, str(tmp_path / "b.safetensors"))
    with pytest.raises(StudioError, match=r"UNet weights the detected layout does not use, first 'model\.diffusion"):
        load_single_file(tmp_path / "b.safetensors")


def test_export_is_atomic_and_refuses_non_sd_pipelines(exported: dict, tmp_path: Path) -> None:
    pipe, _ = exported["sd1"]
    target = tmp_path / "out.safetensors"
    save_single_file(pipe, target)
    assert [p.name for p in tmp_path.iterdir()] == ["out.safetensors"]
    with pytest.raises(StudioError, match="cannot export a"):
        save_single_file(object(), target)  # type: ignore[arg-type]


# --- real sizes, on the meta device: key sets and inferred configs, no weights ----------------------------------


def _meta_models(family: str) -> dict[str, torch.nn.Module]:
    with torch.device("meta"):
        models = {
            "unet": UNet2DConditionModel.from_config(shipped_config(family, "unet")),
            "vae": AutoencoderKL.from_config(shipped_config(family, "vae")),
            "text_encoder": CLIPTextModel(CLIPTextConfig.from_dict(shipped_config(family, "text_encoder"))),
        }
        if family == "sdxl":
            config = CLIPTextConfig.from_dict(shipped_config(family, "text_encoder_2"))
            models["text_encoder_2"] = CLIPTextModelWithProjection(config)
    return models


@pytest.mark.parametrize("family", KINDS)
def test_real_size_key_maps_round_trip(family: str) -> None:
    models = _meta_models(family)
    unet, vae = models["unet"], models["vae"]
    ldm_unet = _export("unet", unet, family)
    assert len(ldm_unet) == len(unet.state_dict())
    if family == "sd1":
        assert "model.diffusion_model.output_blocks.2.1.conv.weight" in ldm_unet  # the well-known SD1 names
        assert "model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight" in ldm_unet
        assert "model.diffusion_model.middle_block.2.out_layers.3.weight" in ldm_unet
    converted = convert_ldm_unet_checkpoint(ldm_unet, dict(unet.config))
    assert set(converted) == set(unet.state_dict())
    assert all(converted[k].shape == v.shape for k, v in unet.state_dict().items())
    inferred = infer_unet_config(_strip(ldm_unet, K.UNET_PREFIX), shipped_config(family, "unet"), family)
    for key in ("block_out_channels", "layers_per_block", "down_block_types", "up_block_types", "attention_head_dim"):
        assert list(np.atleast_1d(inferred[key])) == list(np.atleast_1d(unet.config[key])), key
    assert inferred["cross_attention_dim"] == unet.config.cross_attention_dim

    ldm_vae = _export("vae", vae, family)
    assert "first_stage_model.decoder.up.3.upsample.conv.weight" in ldm_vae
    assert ldm_vae["first_stage_model.encoder.mid.attn_1.q.weight"].ndim == 4
    converted = convert_ldm_vae_checkpoint(ldm_vae, dict(vae.config))
    assert {k: v.shape for k, v in converted.items()} == {k: v.shape for k, v in vae.state_dict().items()}
    inferred = infer_vae_config(_strip(ldm_vae, K.VAE_PREFIX), shipped_config(family, "vae"))
    assert inferred["block_out_channels"] == list(vae.config.block_out_channels)

    for name in ("text_encoder", "text_encoder_2"):
        if name not in models:
            continue
        model = models[name]
        ldm = _export(name, model, family)
        openclip = family == "sd2" or name == "text_encoder_2"
        if openclip:
            prefix = K.SD2_TEXT_PREFIX if family == "sd2" else K.SDXL_TEXT2_PREFIX
            hf = K.openclip_to_hf(_strip(ldm, prefix))
        else:
            prefix = K.SD1_TEXT_PREFIX if family == "sd1" else K.SDXL_TEXT_PREFIX
            hf = _strip(ldm, prefix)
        want = {k.removeprefix("text_model."): v.shape for k, v in model.state_dict().items()}
        assert {k: v.shape for k, v in hf.items()} == want
        config = infer_text_config(hf, {}, heads_known=False)
        assert config["num_attention_heads"] == model.config.num_attention_heads
        assert config["num_hidden_layers"] == model.config.num_hidden_layers


def _strip(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


def test_half_precision_export_and_load(exported: dict, tmp_path: Path) -> None:
    pipe, _ = exported["sd1"]
    path = save_single_file(pipe, tmp_path / "half.safetensors", dtype=torch.float16)
    assert {v.dtype for v in load_file(path).values()} == {torch.float16}
    back = load_single_file(path, dtype=torch.float16)
    want = pipe.unet.state_dict()
    assert all(torch.equal(v, want[k].half()) for k, v in back.unet.state_dict().items())
    with pytest.raises(StudioError, match="prediction_type must be"):
        load_single_file(path, prediction_type="v")


def test_export_refuses_attached_adapters(tmp_path: Path) -> None:
    from peft import LoraConfig

    pipe = BUILDERS["sd1"]()
    pipe.unet.add_adapter(LoraConfig(r=2, target_modules=["to_q"]))
    with pytest.raises(StudioError, match=r"adapter weights attached .*fuse_lora"):
        save_single_file(pipe, tmp_path / "x.safetensors")
    assert not list(tmp_path.iterdir())


def test_studio_loader_takes_single_files(exported: dict) -> None:
    from studio.models.loading import load_pipeline

    pipe = load_pipeline(exported["sdxl"][1])
    assert type(pipe).__name__ == "StableDiffusionXLPipeline"
