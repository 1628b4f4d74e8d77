"""The loop: exact resume (also inside an accumulation window), cancel, NaN guard, objectives, prior, checkpointing."""

from __future__ import annotations

import dataclasses
import re
import threading
from pathlib import Path

import pytest
import torch
from toy_methods import FrozenDown, SparseMasked
from trainer_helpers import emblem, quick, tiny_pipe

import trainers
from studio.errors import StudioError
from trainers import METHODS, DreamBoothLoRA, DreamBoothLoRAConfig, train_loop
from trainers.checkpoint import CHECKPOINT
from trainers.loop import Loop, diffusion_loss, min_snr_weights, training_target
from trainers.streams import epoch_indices, seeded


METHOD_FACTORIES = {
    "dreambooth_lora": lambda: DreamBoothLoRA(DreamBoothLoRAConfig(lr=1e-3, lora_dropout=0.1)),  # dropout: global RNG
    "frozen_down": lambda: FrozenDown(),
    "sparse_masked": lambda: SparseMasked(),
}
STEPS, ACCUM = 4, 2  # 2N optimizer steps of 2 micro-steps each


def _checkpoint(run_dir: Path) -> dict:
    return torch.load(run_dir / CHECKPOINT, map_location="cpu", weights_only=True)


def _assert_same(a: object, b: object, where: str = "") -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and torch.equal(a, b), f"tensor differs at {where}"
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), f"keys differ at {where}"
        for k in a:
            _assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), f"length differs at {where}"
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{a!r} != {b!r} at {where}"


@pytest.mark.parametrize("stop", ["event-at-step", "inside-window"])
@pytest.mark.parametrize("method", list(METHOD_FACTORIES))
def test_resume_is_bit_identical(method: str, stop: str, tmp_path: Path) -> None:
    config = quick(train_steps=STEPS, grad_accum=ACCUM, lr_scheduler="cosine", lr_warmup_steps=1)
    straight = train_loop(METHOD_FACTORIES[method](), tiny_pipe(), emblem(), config, tmp_path / "straight")
    assert straight.status == "done" and len(straight.losses) == STEPS

    run = tmp_path / "stopped"
    if stop == "event-at-step":  # a UI's Cancel button: set after step N, the loop stops before the next micro-step
        event = threading.Event()
        callbacks = trainers.Callbacks(on_step=lambda step, loss: event.set() if step == STEPS // 2 else None)
        first = train_loop(
            METHOD_FACTORIES[method](), tiny_pipe(), emblem(), config, run, callbacks=callbacks, cancel=event
        )
        assert first.status == "cancelled" and first.step == STEPS // 2
        assert _checkpoint(run)["grads"] == {}
    else:  # stop after N steps and one micro-step of the next window: the open window's gradients are kept
        calls = iter(range(10_000))
        stop_at = STEPS // 2 * ACCUM + 1
        first = train_loop(
            METHOD_FACTORIES[method](), tiny_pipe(), emblem(), config, run, cancel=lambda: next(calls) >= stop_at
        )
        assert first.status == "cancelled" and first.step == STEPS // 2
        saved = _checkpoint(run)
        assert len(saved["window"]) == 1 and saved["grads"], "the open window's gradients must be saved"
    second = train_loop(METHOD_FACTORIES[method](), tiny_pipe(), emblem(), config, run, resume=True)
    assert second.status == "done" and second.losses == straight.losses
    a, b = _checkpoint(tmp_path / "straight"), _checkpoint(run)
    assert a["step"] == b["step"] == STEPS
    _assert_same(a["method"], b["method"], "method")
    _assert_same(a["optimizer"], b["optimizer"], "optimizer")
    _assert_same(a["lr_scheduler"], b["lr_scheduler"], "lr_scheduler")
    assert any(not torch.equal(v, torch.zeros_like(v)) for v in a["method"].values()), "nothing was trained"


def test_nan_guard_keeps_last_good_checkpoint_and_resumes(tmp_path: Path) -> None:
    config = quick(train_steps=6, save_every=1)
    pipe, poisoned = tiny_pipe(), []
    pipe.unet.conv_out.register_forward_hook(lambda m, args, out: out * float("nan") if poisoned else out)
    callbacks = trainers.Callbacks(on_step=lambda step, loss: poisoned.append(True) if step == 3 else None)
    with pytest.raises(StudioError, match=r"loss became nan at step 4.*last good checkpoint \(step 2\).*lower --lr"):
        train_loop(DreamBoothLoRA(), pipe, emblem(), config, tmp_path, callbacks=callbacks)
    kept = _checkpoint(tmp_path)
    assert kept["step"] == 2 and len(kept["losses"]) == 2
    assert all(torch.isfinite(v).all() for v in kept["method"].values())
    method = DreamBoothLoRA(DreamBoothLoRAConfig(lr=5e-5))  # NaN source gone; resumed with a lower lr
    result = train_loop(method, tiny_pipe(), emblem(), config, tmp_path, resume=True)
    assert result.status == "done" and result.step == 6 and result.losses[:2] == kept["losses"]
    assert {g["initial_lr"] for g in _checkpoint(tmp_path)["optimizer"]["param_groups"]} == {5e-5}  # UNet, text


def test_reading_losses_every_few_steps_trains_the_same_and_still_stops_on_nan(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A GPU run reads its losses every few steps (no wait for the GPU in between); forced here on the CPU."""
    every = train_loop(DreamBoothLoRA(), tiny_pipe(), emblem(), quick(train_steps=5), tmp_path / "every")
    monkeypatch.setattr(trainers.loop, "_reads_every", lambda device, callbacks: 3)
    method = DreamBoothLoRA()
    deferred = train_loop(method, tiny_pipe(), emblem(), quick(train_steps=5), tmp_path / "deferred")
    assert deferred.losses == every.losses and all(isinstance(v, float) for v in deferred.losses)
    _assert_same(_checkpoint(tmp_path / "every")["method"], _checkpoint(tmp_path / "deferred")["method"], "method")

    pipe, calls = tiny_pipe(), []  # UNet calls: steps 1 and 2, the probe before the checkpoint at 2, then step 3
    pipe.unet.conv_out.register_forward_hook(lambda m, a, out: out * float("nan") if calls.append(1) or len(calls) >= 4
                                             else out)
    with pytest.raises(StudioError, match=r"loss became nan \(first at step 3\).*last good checkpoint \(step 2\)"):
        train_loop(DreamBoothLoRA(), pipe, emblem(), quick(train_steps=6, save_every=2), tmp_path / "nan")
    assert _checkpoint(tmp_path / "nan")["step"] == 2


def test_nan_guard_on_a_diverging_lr(tmp_path: Path) -> None:
    with pytest.raises(
        StudioError, match=r"diverged.*no checkpoint was saved.*lower --lr \(now 1e\+30\) and start again"
    ):
        train_loop(
            DreamBoothLoRA(DreamBoothLoRAConfig(lr=1e30)),
            tiny_pipe(),
            emblem(),
            quick(train_steps=6, save_every=1),
            tmp_path,
        )
    assert not (tmp_path / CHECKPOINT).exists(), "a diverged state must never be written as a checkpoint"


def test_cancel_before_start_leaves_a_resumable_checkpoint(tmp_path: Path) -> None:
    done = []
    callbacks = trainers.Callbacks(on_done=done.append)
    result = train_loop(
        DreamBoothLoRA(), tiny_pipe(), emblem(), quick(), tmp_path, callbacks=callbacks, cancel=lambda: True
    )
    assert result.status == "cancelled" and result.step == 0 and done == [result]
    assert _checkpoint(tmp_path)["step"] == 0
    steps, samples = [], []
    callbacks = trainers.Callbacks(
        on_step=lambda s, loss: steps.append((s, loss)), on_sample=lambda s, images: samples.append((s, len(images)))
    )
    result = train_loop(
        DreamBoothLoRA(),
        tiny_pipe(),
        emblem(sample_prompts=["a sks emblem"]),
        quick(train_steps=2),
        tmp_path,
        callbacks=callbacks,
        resume=True,
    )
    assert [s for s, _ in steps] == [1, 2] and samples == [(2, 1)] and len(result.samples) == 1
    assert (tmp_path / "loss.png").is_file() and (tmp_path / "samples" / "step-000002.png").is_file()


def test_training_targets() -> None:
    from diffusers import DDPMScheduler

    z0, noise = torch.randn(3, 4, 2, 2), torch.randn(3, 4, 2, 2)
    t = torch.tensor([0, 500, 999])
    sched = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    abar = torch.cumprod(1 - torch.linspace(0.00085**0.5, 0.012**0.5, 1000) ** 2, 0)[t].view(-1, 1, 1, 1)
    assert torch.equal(training_target(sched, z0, noise, t), noise)
    sched = DDPMScheduler.from_config(sched.config, prediction_type="v_prediction")
    v = abar.sqrt() * noise - (1 - abar).sqrt() * z0  # Salimans & Ho: v = alpha_t eps - sigma_t x
    torch.testing.assert_close(training_target(sched, z0, noise, t), v)
    sched = DDPMScheduler.from_config(sched.config, prediction_type="sample")
    assert torch.equal(training_target(sched, z0, noise, t), z0)
    sched = DDPMScheduler.from_config(sched.config, prediction_type="flow")
    with pytest.raises(StudioError, match="epsilon, v_prediction"):
        training_target(sched, z0, noise, t)


def test_min_snr_weights_by_hand() -> None:
    """Min-SNR-gamma (Hang et al. 2023, eq. 8-9): epsilon min(SNR, g)/SNR, v min(SNR, g)/(SNR + 1), x0 min(SNR, g)."""
    from diffusers import DDPMScheduler

    sched = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    t = torch.tensor([0, 100, 500, 999])
    abar = torch.cumprod(1 - torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2, 0)[t]
    snr = abar / (1 - abar)  # t=0: about 1175 (clipped to 5); t=999: about 0.005 (kept)
    clipped = snr.clamp(max=5.0)
    w = min_snr_weights(sched, t, 5.0).double()
    torch.testing.assert_close(w, clipped / snr, rtol=1e-4, atol=1e-7)
    assert w[-1] == pytest.approx(1.0) and w[0] < 0.01  # noisy steps keep their weight, clean ones lose it
    v = DDPMScheduler.from_config(sched.config, prediction_type="v_prediction")
    torch.testing.assert_close(min_snr_weights(v, t, 5.0).double(), clipped / (snr + 1), rtol=1e-4, atol=1e-7)
    x0 = DDPMScheduler.from_config(sched.config, prediction_type="sample")
    torch.testing.assert_close(min_snr_weights(x0, t, 5.0).double(), clipped, rtol=1e-4, atol=1e-7)
    pred, target = torch.randn(4, 4, 2, 2), torch.randn(4, 4, 2, 2)
    per = (pred - target).pow(2).mean((1, 2, 3))
    torch.testing.assert_close(diffusion_loss(pred, target, weights=w.float()), (per * w.float()).mean())
    weighted = per * w.float()  # with class images: each half weighted, then DreamBooth's sum
    expected = weighted[:2].mean() + 0.5 * weighted[2:].mean()
    torch.testing.assert_close(diffusion_loss(pred, target, 2, 0.5, w.float()), expected)


@pytest.mark.parametrize("kind", ["sd1", "sd2"])  # epsilon, v-prediction
def test_micro_loss_is_the_diffusion_objective(kind: str, tmp_path: Path) -> None:
    """Recompute micro-step 0 by hand: z_t = sqrt(abar) z0 + sqrt(1 - abar) eps, target eps or v, plain MSE."""
    pipe = tiny_pipe(kind)
    loop = Loop(DreamBoothLoRA(), pipe, emblem(), quick(), tmp_path)
    with torch.no_grad():
        loss = loop.micro_loss(0)
        idx = epoch_indices(0, 0, 0, 1, 3)
        g = seeded(0, 2, 0, 0)
        mean, std = loop.instance[0][idx], loop.instance[1][idx]
        z0 = (mean + std * torch.randn(mean.shape, generator=g)) * pipe.vae.config.scaling_factor
        noise = torch.randn(z0.shape, generator=g)
        t = torch.randint(0, 1000, (1,), generator=g)
        betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
        abar = torch.cumprod(1 - betas, 0)[t].float().view(-1, 1, 1, 1)
        zt = abar.sqrt() * z0 + (1 - abar).sqrt() * noise
        target = noise if kind == "sd1" else abar.sqrt() * noise - (1 - abar).sqrt() * z0
        ids = pipe.tokenizer([emblem().prompts[idx[0]]], padding="max_length", max_length=77, return_tensors="pt")
        pred = pipe.unet(zt, t, pipe.text_encoder(ids.input_ids)[0]).sample
    assert loop.noise.config.prediction_type == ("epsilon" if kind == "sd1" else "v_prediction")
    torch.testing.assert_close(loss, torch.nn.functional.mse_loss(pred, target), rtol=1e-4, atol=1e-6)


def test_prior_loss_and_class_image_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pred, target = torch.randn(4, 4, 2, 2), torch.randn(4, 4, 2, 2)
    mse = torch.nn.functional.mse_loss
    expected = mse(pred[:2], target[:2]) + 0.5 * mse(pred[2:], target[2:])
    torch.testing.assert_close(diffusion_loss(pred, target, 2, 0.5), expected)

    import studio.generate

    calls = []
    real = studio.generate.generate
    monkeypatch.setattr(
        studio.generate, "generate", lambda config, **kw: calls.append(kw["seeds"]) or real(config, **kw)
    )
    one = dataclasses.replace(emblem(), class_prompts=["a large emblem"])
    loop = Loop(DreamBoothLoRA(), tiny_pipe(), one, quick(num_class_images=3), tmp_path / "a")
    assert calls == [[0, 1, 2]] and loop.prior[0].shape[0] == 3
    calls.clear()
    loop = Loop(DreamBoothLoRA(), tiny_pipe(), one, quick(num_class_images=5), tmp_path / "b")
    assert calls == [[3, 4]], "cached images are reused, only new ones rendered"
    assert torch.isfinite(loop.micro_loss(0))


def test_varied_class_prompts_each_image_its_own(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Class image i is rendered from prompt i (cycling) with seed i, and trains under that prompt."""
    import studio.generate
    from trainers.loop import _CLASS
    from trainers.prior import class_image_dir

    calls = []
    real = studio.generate.generate
    monkeypatch.setattr(
        studio.generate, "generate", lambda c, **kw: calls.append((kw["seeds"], kw["prompts"])) or real(c, **kw)
    )
    prompts = ["a large red circle on the left on a white background", "a small blue square on a black background"]
    data = dataclasses.replace(emblem(), class_prompts=prompts)
    pipe = tiny_pipe()
    loop = Loop(DreamBoothLoRA(), pipe, data, quick(num_class_images=5, batch_size=2), tmp_path / "a")
    p0, p1 = prompts
    assert calls == [([0, 1, 2, 3, 4], [p0, p1, p0, p1, p0])]  # one batch, image i with seed i
    for i in range(5):  # cached per prompt: an adapter trained on another subject reuses them
        assert (class_image_dir(pipe, prompts[i % 2], 32, 1) / f"{i:05d}.png").is_file()
    seen = []
    monkeypatch.setattr(loop, "_predict", lambda zt, t, p: seen.append(p) or Loop._predict(loop, zt, t, p))
    loop.micro_loss(1)
    class_idx = epoch_indices(0, _CLASS, 2, 2, 5)  # micro-step 1, batch 2: positions 2 and 3
    assert seen[0][2:] == [prompts[i % 2] for i in class_idx] and seen[0][:2] != seen[0][2:]
    calls.clear()
    Loop(DreamBoothLoRA(), tiny_pipe(), data, quick(num_class_images=5, batch_size=2), tmp_path / "b")
    assert calls == []


def test_gradient_checkpointing_gives_the_same_gradients(tmp_path: Path) -> None:
    grads = []
    for checkpointing in (False, True):
        method = DreamBoothLoRA()
        loop = Loop(method, tiny_pipe(), emblem(), quick(gradient_checkpointing=checkpointing), tmp_path)
        loop.micro_loss(0).backward()
        grads.append({k: p.grad.clone() for k, p in method.trainable_tensors().items()})
    assert grads[0].keys() == grads[1].keys()
    for k in grads[0]:
        torch.testing.assert_close(grads[0][k], grads[1][k])
    assert any(g.abs().sum() > 0 for g in grads[0].values())


def test_loop_names_no_method_and_registry_keys_match() -> None:
    source = (Path(trainers.__file__).parent / "loop.py").read_text().lower()
    for word in ("dreambooth_lora", "kronecker", "lora", "lokr", "sara", "orthogonal", "b_lora"):
        assert not re.search(rf"\b{word}\b", source), f"loop.py names a method: {word}"
    assert "method ==" not in source and "isinstance(method" not in source
    for key, cls in METHODS.items():
        assert cls.config_cls.method == key


@pytest.mark.parametrize("precision", ["bf16", pytest.param("auto", marks=pytest.mark.gpu)])
def test_bf16_keeps_frozen_weights_bf16_and_trained_tensors_fp32(precision: str, tmp_path: Path) -> None:
    device = "cuda" if precision == "auto" else "cpu"  # auto means bf16 on a GPU
    method, pipe = DreamBoothLoRA(), tiny_pipe()
    config = quick(mixed_precision=precision, train_steps=2, device=device)
    result = train_loop(method, pipe, emblem(sample_prompts=["a sks emblem"]), config, tmp_path)
    assert result.status == "done" and all(torch.isfinite(torch.tensor(result.losses))) and len(result.samples) == 1
    assert pipe.unet.conv_in.weight.dtype == pipe.vae.decoder.conv_out.weight.dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in method.trainable_tensors().values())
    assert any(k.endswith("lora_B.weight") and p.abs().max() > 0 for k, p in method.trainable_tensors().items())
    again = quick(mixed_precision=precision, train_steps=3, device=device)
    resumed = train_loop(DreamBoothLoRA(), tiny_pipe(), emblem(), again, tmp_path, resume=True)
    assert resumed.step == 3 and resumed.losses[:2] == result.losses


def test_device_cuda_without_a_gpu_is_a_clear_error(tmp_path: Path) -> None:
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    with pytest.raises(StudioError, match="--device cuda: no CUDA device"):
        train_loop(DreamBoothLoRA(), tiny_pipe(), emblem(), quick(device="cuda"), tmp_path)


@pytest.mark.gpu
def test_one_process_trains_on_the_gpu_then_on_the_cpu(tmp_path: Path) -> None:
    """accelerate keeps the first run's device process-wide; each run of the loop gets the device it asks for."""
    for device in ("cuda", "cpu", "cuda"):
        pipe = tiny_pipe()
        result = train_loop(DreamBoothLoRA(), pipe, emblem(), quick(device=device), tmp_path / device)
        assert result.status == "done" and pipe.unet.device.type == device
