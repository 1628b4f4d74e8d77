"""Generation memory: a request that cannot fit is refused before any work, with the estimate and the free memory;
one that fits only with VAE tiling gets it; an out-of-memory error is retried with the savers, then explained."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch
from diffusers.models.attention_processor import AttnProcessor

from studio.errors import StudioError
from studio.generate import GenerateConfig, cached_pipeline, generate, memory_plan
from studio.memory import estimate
from studio.models import load_pipeline
from studio.sizes import human


def _pipe(tiny_dirs: dict) -> object:
    pipe = cached_pipeline(str(tiny_dirs["sd1"]), "cpu")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_a_request_that_cannot_fit_is_refused_before_any_work(tiny_dirs: dict) -> None:
    pipe, steps = _pipe(tiny_dirs), []
    config = GenerateConfig(prompt="a red star", model=str(tiny_dirs["sd1"]), size="20000x20000", steps=2)
    start = time.perf_counter()
    with pytest.raises(StudioError, match=r"1 image\(s\) at 20000x20000 need about [\d.]+ (GB|TB) \(overhead .*, unet "
                                          r".*, vae .*\); cpu has [\d.]+ [KMGT]?B free even with VAE tiling; lower "
                                          r"--size or --num-images"):
        generate(config, pipe=pipe, progress=lambda step, total: steps.append(step))
    assert steps == [] and time.perf_counter() - start < 5


def test_the_estimate_grows_with_the_request_and_counts_materialised_attention(tiny_dirs: dict) -> None:
    pipe = _pipe(tiny_dirs)

    def total(size: int, n: int = 1, **kw: bool) -> int:
        parts = estimate(pipe, size, size, n, True, **{"attention_slicing": False, "vae_tiling": False, **kw})
        return parts["overhead"] + parts["latents"] + max(parts["unet"] + parts["attention"],
                                                          parts["vae"] + parts["output"])

    assert total(64) < total(128) < total(256) and total(128) < total(128, n=2)
    vae = {tiled: estimate(pipe, 512, 512, 1, True, attention_slicing=False, vae_tiling=tiled)["vae"]
           for tiled in (False, True)}
    assert vae[True] < vae[False] / 4
    fused = estimate(pipe, 256, 256, 1, True, attention_slicing=False, vae_tiling=False)["attention"]
    procs = dict(pipe.unet.attn_processors)
    pipe.unet.set_attn_processor(AttnProcessor())  # scores materialised: (2 images x heads, N, N) at 128x128 latents
    try:
        full = estimate(pipe, 256, 256, 1, True, attention_slicing=False, vae_tiling=False)["attention"]
        sliced = estimate(pipe, 256, 256, 1, True, attention_slicing=True, vae_tiling=False)["attention"]
    finally:
        pipe.unet.set_attn_processor(procs)
    heads = pipe.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.heads
    assert fused == 0 and full == 2 * heads * (128 * 128) ** 2 * 4 and sliced == (128 * 128) ** 2 * 4


def test_vae_tiling_is_switched_on_when_only_it_makes_the_request_fit() -> None:
    model = "studio-tiny"  # its decoder, at the full size, outweighs its UNet (a real SD VAE does the same)
    pipe = load_pipeline(model)  # not the process-wide cache: a later test may hide the embedded model
    pipe.set_progress_bar_config(disable=True)
    config = GenerateConfig(prompt="a red star", model=model, size="128x128", steps=1, guidance=1.0)
    plain = memory_plan(config, pipe, free_memory=10**12)
    tiled = memory_plan(GenerateConfig(**{**config.__dict__, "vae_tiling": True}), pipe, free_memory=10**12)
    assert not plain.vae_tiling and tiled.total < plain.total
    free = (plain.total + tiled.total) // 2
    result = generate(config, pipe=pipe, free_memory=free)
    assert result.params[0]["vae_tiling"] is True and result.images[0].size == (128, 128)
    assert pipe.vae.use_tiling is False and pipe.vae.use_slicing is False  # the cached pipeline is put back
    with pytest.raises(StudioError, match=rf"need about {human(plain.total)}.*has {human(free)} free; lower --size"):
        generate(GenerateConfig(**{**config.__dict__, "vae_tiling": False}), pipe=pipe, free_memory=free)


def test_out_of_memory_is_retried_with_the_savers_then_explained(tiny_dirs: dict) -> None:
    pipe, model = _pipe(tiny_dirs), str(tiny_dirs["sd1"])
    config = GenerateConfig(prompt="a red star", model=model, size="32x32", steps=1, guidance=1.0)
    calls = []

    def oom_unless_tiled(module: torch.nn.Module, args: tuple) -> None:  # a GPU that fits only the tiled decode
        calls.append(pipe.vae.use_tiling)
        if not pipe.vae.use_tiling:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    hook = pipe.unet.register_forward_pre_hook(oom_unless_tiled)
    try:
        result = generate(config, pipe=pipe)
        assert calls == [False, True] and result.params[0]["vae_tiling"] is True
        with pytest.raises(StudioError, match=r"out of memory on cpu making 1 image\(s\) at 32x32 \(estimated .*, "
                                              r".* free when it started\); lower --size or --num-images or pass "
                                              r"--vae-tiling"):
            generate(GenerateConfig(**{**config.__dict__, "vae_tiling": False}), pipe=pipe)
    finally:
        hook.remove()
    assert pipe.vae.use_tiling is False
    assert Path(model).is_dir()
