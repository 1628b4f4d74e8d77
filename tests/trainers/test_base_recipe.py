"""The base-training recipe at a tiny scale: exact resume, outputs, and a standard diffusers export."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from studio.errors import StudioError
from trainers.recipes.base import BaseTrainConfig, BaseTrainer, step_batch


def _trainer(run: Path, config: BaseTrainConfig | None = None) -> BaseTrainer:
    return BaseTrainer(run, config, device="cpu")  # explicit: the suite also runs where a GPU is visible


MICRO = {
    "steps": 4,
    "batch_size": 4,
    "warmup": 1,
    "save_every": 2,
    "sample_every": 100,
    "sample_steps": 2,
    "unet": {"block_out_channels": [32, 32, 32]},
}


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


def _flat(state: dict) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in state.items():
        if isinstance(value, dict):
            out.update({f"{key}.{k}": v for k, v in _flat(value).items()})
        elif isinstance(value, (list, tuple)):
            out.update({f"{key}.{i}": v for i, v in enumerate(value) if isinstance(v, torch.Tensor)})
        elif isinstance(value, torch.Tensor):
            out[key] = value
    return out


def test_batches_are_a_function_of_seed_and_step() -> None:
    config = BaseTrainConfig(**MICRO)
    a, ca = step_batch(3, config, torch.device("cpu"))
    b, cb = step_batch(3, config, torch.device("cpu"))
    c, _ = step_batch(4, config, torch.device("cpu"))
    assert a.shape == (4, 3, 64, 64) and -1 <= a.min() and a.max() <= 1
    assert torch.equal(a, b) and ca == cb and not torch.equal(a, c)
    config = BaseTrainConfig(**{**MICRO, "batch_size": 400})
    _, captions = step_batch(0, config, torch.device("cpu"))
    empty = sum(c == "" for c in captions) / len(captions)
    assert 0.05 < empty < 0.15  # 10% caption dropout for classifier-free guidance


def _checkpoint(run: Path) -> dict[str, torch.Tensor]:
    return _flat(torch.load(run / "checkpoint.pt", weights_only=True))


def test_stop_and_resume_gives_the_same_weights(tmp_path: Path) -> None:
    straight = _trainer(tmp_path / "a", BaseTrainConfig(**MICRO))
    assert straight.train(progress=False)["status"] == "done"

    first = _trainer(tmp_path / "b", BaseTrainConfig(**MICRO))
    assert first.train(progress=False, cancel=lambda: first.step >= 1)["status"] == "cancelled"
    assert first.step == 1
    resumed = _trainer(tmp_path / "b")  # a new process would do exactly this
    assert resumed.step == 1
    resumed.train(progress=False)

    a, b = _checkpoint(tmp_path / "a"), _checkpoint(tmp_path / "b")
    assert a.keys() == b.keys() and len(a) > 100 and any(k.startswith("method.ema.") for k in a)
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])][:5]
    assert straight.losses == resumed.losses and len(straight.losses) == 4
    assert (tmp_path / "b" / "loss.png").is_file() and (tmp_path / "b" / "samples" / "step-000004.png").is_file()
    assert json.loads((tmp_path / "b" / "losses.json").read_text()) == resumed.losses
    ema = straight.method.ema_unet().state_dict()
    live = straight.pipe.unet.state_dict()
    assert any(not torch.equal(ema[k], live[k]) for k in live)  # the EMA, not the live weights, ships


def test_the_ema_moves_towards_the_trained_weights(tmp_path: Path) -> None:
    trainer = _trainer(tmp_path / "e", BaseTrainConfig(**MICRO))
    start = {k: v.clone() for k, v in trainer.pipe.unet.state_dict().items()}
    trainer.train(progress=False)
    ema, live = trainer.method.ema_unet().state_dict(), trainer.pipe.unet.state_dict()
    key = "conv_in.weight"
    assert not torch.equal(live[key], start[key])
    moved, total = (ema[key] - start[key]).norm(), (live[key] - start[key]).norm()
    assert 0 < moved <= total * 1.0001


def test_resuming_with_other_settings_is_refused(tmp_path: Path) -> None:
    run = _trainer(tmp_path / "r", BaseTrainConfig(**MICRO))
    run.train(progress=False, cancel=lambda: run.step >= 1)
    with pytest.raises(StudioError, match="other settings"):
        _trainer(tmp_path / "r", BaseTrainConfig(**{**MICRO, "lr": 1e-3}))
    with pytest.raises(StudioError, match="no run"):
        _trainer(tmp_path / "empty")


def test_damaged_checkpoint_says_what_to_do(tmp_path: Path) -> None:
    run = _trainer(tmp_path / "d", BaseTrainConfig(**MICRO))
    run.train(progress=False, cancel=lambda: run.step >= 1)
    (tmp_path / "d" / "checkpoint.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(StudioError, match="delete it to restart"):
        _trainer(tmp_path / "d")


def test_export_is_a_standard_diffusers_folder_equal_to_studio_generate(tmp_path: Path) -> None:
    from diffusers import StableDiffusionPipeline

    from studio.generate import GenerateConfig, generate
    from studio.world.base import export_base

    trainer = _trainer(tmp_path / "run", BaseTrainConfig(**{**MICRO, "steps": 2}))
    trainer.train(progress=False)
    # Training two steps leaves the UNet near its random start; perturb it so the check sees real weights.
    pipe = trainer.ema_pipeline()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in pipe.unet.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    out = export_base(pipe, tmp_path / "model", extra={"guidance": 4.0})
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert "model_index.json" in files and "unet/config.json" in files and "studio.json" in files
    assert all(p.stat().st_size <= 16 * 2**20 for p in out.rglob("*"))
    assert all(v.dtype == torch.float16 for v in _safetensors(out / "unet").values())

    reference = StableDiffusionPipeline.from_pretrained(str(out))  # no other argument
    assert reference.unet.dtype == torch.float32
    prompt, seed = "a large red circle on the left on a white background", 5
    expected = reference(prompt, num_inference_steps=4, guidance_scale=4.0, output_type="np",
                         generator=torch.Generator().manual_seed(seed)).images[0]
    result = generate(GenerateConfig(prompt=prompt, model=str(out), seed=seed, steps=4), output_type="np")
    assert result.params[0]["guidance"] == 4.0  # the model's recommended guidance is the default
    ours = np.asarray(result.images[0])
    assert expected.std() > 0.01
    assert np.abs(ours - expected).max() < 1e-5


def _safetensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out = {}
    for f in folder.glob("*.safetensors"):
        out.update(load_file(f))
    return out


def test_a_second_stage_starts_from_a_model_folder(tmp_path: Path) -> None:
    from studio.world.base import export_base

    first = _trainer(tmp_path / "one", BaseTrainConfig(**{**MICRO, "steps": 1}))
    first.train(progress=False)
    pipe = first.ema_pipeline()
    with torch.no_grad():
        for p in pipe.unet.parameters():
            p.add_(0.05)  # not the seeded initialisation of the next run
    out = export_base(pipe, tmp_path / "model")
    second = _trainer(tmp_path / "two", BaseTrainConfig(**{**MICRO, "init": str(out)}))
    exported = {k: v.half().float() for k, v in pipe.unet.state_dict().items()}  # shipped in fp16
    assert all(torch.equal(second.pipe.unet.state_dict()[k], v) for k, v in exported.items())
    with pytest.raises(StudioError, match="another architecture"):
        wider = {**MICRO, "init": str(out), "unet": {**MICRO["unet"], "block_out_channels": [32, 64, 96]}}
        _trainer(tmp_path / "three", BaseTrainConfig(**wider))
    with pytest.raises(StudioError, match="no unet/ folder"):
        _trainer(tmp_path / "four", BaseTrainConfig(**{**MICRO, "init": str(tmp_path)}))


def test_a_second_stage_may_add_attention_where_the_first_had_none(tmp_path: Path) -> None:
    from studio.world.base import UNET_CONFIG, build_unet
    from trainers.recipes.base import initial_unet

    small = {**UNET_CONFIG, **MICRO["unet"]}
    first = build_unet({**small, "down_block_types": ["DownBlock2D", *small["down_block_types"][1:]],
                        "up_block_types": [*small["up_block_types"][:-1], "UpBlock2D"]})
    with torch.no_grad():
        for p in first.parameters():
            p.add_(0.05)
    first.save_pretrained(tmp_path / "model" / "unet")
    torch.manual_seed(0)
    grown = build_unet(small)
    seeded = {k: v.clone() for k, v in grown.state_dict().items()}
    fresh = initial_unet(grown, str(tmp_path / "model"))
    assert fresh and all(k.startswith(("down_blocks.0.attentions", "up_blocks.2.attentions")) for k in fresh)
    state = grown.state_dict()
    assert all(torch.equal(state[k], seeded[k]) for k in fresh)  # new attention keeps its seeded initialisation
    assert all(torch.equal(state[k], v) for k, v in first.state_dict().items())  # the rest is loaded


def test_zero_terminal_snr_trains_and_samples_with_v_prediction(tmp_path: Path) -> None:
    from studio.world.base import ZERO_SNR

    trainer = _trainer(tmp_path / "run", BaseTrainConfig(**{**MICRO, "steps": 1, "scheduler": dict(ZERO_SNR)}))
    trainer.train(progress=False)
    for scheduler in (trainer.loop.noise, trainer.ema_pipeline().scheduler):
        assert scheduler.config.prediction_type == "v_prediction"
        assert scheduler.alphas_cumprod[-1] < 1e-6  # the last training timestep is pure noise (arXiv:2305.08891 3.1)
    assert all(np.isfinite(trainer.losses))  # Min-SNR's v weight min(SNR, gamma) / (SNR + 1) is 0 there, not 0/0


def test_a_stage_can_shorten_the_context_limit_objects_and_continue_the_text_encoder(tmp_path: Path) -> None:
    from transformers import CLIPTokenizer

    from studio.world.base import export_base

    images, captions = step_batch(0, BaseTrainConfig(**{**MICRO, "max_objects": 1, "caption_dropout": 0.0,
                                                        "free_phrasing": 0.0}), torch.device("cpu"))
    assert images.shape[0] == 4 and all(" and " not in c for c in captions)  # one object per scene

    first = _trainer(tmp_path / "one", BaseTrainConfig(**{**MICRO, "steps": 1, "max_length": 40}))
    first.train(progress=False)
    pipe = first.ema_pipeline()
    assert pipe.tokenizer.model_max_length == 40
    with torch.no_grad():
        for p in pipe.text_encoder.parameters():
            p.mul_(1.1)  # not the world CLIP's text tower any more
    out = export_base(pipe, tmp_path / "model")
    assert CLIPTokenizer.from_pretrained(out / "tokenizer").model_max_length == 40  # kept by every pipeline

    stage = {**MICRO, "init": str(out), "train_text_encoder": True}
    kept = _trainer(tmp_path / "two", BaseTrainConfig(**{**stage, "init_text_encoder": True}))
    fresh = _trainer(tmp_path / "three", BaseTrainConfig(**stage))
    exported = {k: v.half().float() for k, v in pipe.text_encoder.state_dict().items()}  # shipped in fp16
    assert all(torch.equal(kept.pipe.text_encoder.state_dict()[k], v) for k, v in exported.items())
    assert not all(torch.equal(fresh.pipe.text_encoder.state_dict()[k], v) for k, v in exported.items())
    (out / "text_encoder" / "config.json").unlink()
    with pytest.raises(StudioError, match="no text_encoder/ folder"):
        _trainer(tmp_path / "four", BaseTrainConfig(**{**stage, "init_text_encoder": True}))
    with pytest.raises(StudioError, match="max-objects must be"):
        BaseTrainConfig(max_objects=0)
    with pytest.raises(StudioError, match="max-length must be"):
        BaseTrainConfig(max_length=100)
