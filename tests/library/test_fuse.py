"""Active adapters merged into the weights for one plain generation: the same images as unmerged, the weights the
same bits afterwards, and no merge where something may change the adapters during the call."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from composer_helpers import add_random_adapter

import studio.library.fuse as fuse
from studio.generate import GenerateConfig, cached_pipeline, generate
from studio.library.fuse import merged_for_call
from studio.library.load import load_adapters, unload_adapters


@pytest.fixture
def pipe(tiny_dirs: dict):  # noqa: ANN201
    pipe = cached_pipeline(str(tiny_dirs["sd1"]), "cpu")
    add_random_adapter(pipe, "fuse-a", seed=1, scale=0.4)
    add_random_adapter(pipe, "fuse-b", seed=2, scale=0.4)
    yield pipe
    unload_adapters(pipe)


def _weights(pipe) -> dict[str, torch.Tensor]:  # noqa: ANN001
    return {f"{c}.{n}": p.detach().clone() for c in ("unet", "text_encoder")
            for n, p in getattr(pipe, c).named_parameters()}


def test_merged_generation_equals_unmerged_and_restores_the_weights(pipe, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: ANN001
    config = GenerateConfig(prompt="a red star <lora:fuse-a:0.8>", model=pipe.name_or_path, seed=4, steps=3)
    load_adapters(pipe, ["fuse-b"], [0.5])  # the caller's adapter: merged with the tagged one for the call
    before = _weights(pipe)
    seen = []  # during each call (the text encoder runs inside it): the UNet's PEFT layers, unmerged
    pipe.text_encoder.register_forward_hook(lambda *args: seen.append(
        sum(not m.merged for m in pipe.unet.modules() if isinstance(m, fuse.BaseTunerLayer))))

    def image(budget: int) -> np.ndarray:
        monkeypatch.setattr(fuse, "BUDGET", budget)
        return generate(config, pipe=pipe, output_type="np").images[0]

    try:
        unmerged, merged = image(0), image(1 << 30)
    finally:
        pipe.text_encoder._forward_hooks.clear()
    held = seen[0]
    assert held > 0 and seen == [held, held, 0, 0]  # prompt and negative; merged, the base modules run in their place
    np.testing.assert_allclose(merged, unmerged, atol=1e-5)
    plain = GenerateConfig(prompt="a red star", model=pipe.name_or_path, seed=4, steps=3)
    unload_adapters(pipe, ["fuse-b"])
    assert np.abs(merged - generate(plain, pipe=pipe, output_type="np").images[0]).max() > 1e-3  # adapters matter
    load_adapters(pipe, ["fuse-b"], [0.5])
    after = _weights(pipe)
    assert all(torch.equal(before[k], after[k]) for k in before)  # bit for bit, also where the adapters live


def test_nothing_is_merged_where_the_adapters_may_change_during_the_call(pipe,  # noqa: ANN001
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    load_adapters(pipe, ["fuse-a"])
    with merged_for_call(pipe) as done:
        assert done
    handle = pipe.unet.mid_block.register_forward_hook(lambda *args: None)  # a composer's hook
    with merged_for_call(pipe) as done:
        assert not done
    handle.remove()
    pipe.unet.forward = pipe.unet.forward  # a composer's forward wrapper (an instance attribute)
    try:
        with merged_for_call(pipe) as done:
            assert not done
    finally:
        del pipe.unet.forward
    layers = [m for c in fuse.COMPONENTS if getattr(pipe, c, None) is not None for m in fuse._active(getattr(pipe, c))]
    monkeypatch.setattr(fuse, "BUDGET", 1)
    assert "exceeds 0 MB" in fuse.why_not_merge(pipe, layers)
    monkeypatch.setattr(fuse, "BUDGET", 1 << 30)
    lora_b = next(p for m in layers for n, p in m.named_parameters() if "lora_B" in n)
    lora_b.requires_grad_(True)  # a trained adapter (a training run's preview)
    try:
        assert fuse.why_not_merge(pipe, layers) == "an adapter is being trained"
    finally:
        lora_b.requires_grad_(False)


def test_merged_layers_are_taken_out_for_the_call_and_put_back_after(pipe) -> None:  # noqa: ANN001
    load_adapters(pipe, ["fuse-a", "fuse-b"], [0.7, -0.4])
    unet = pipe.unet
    g = torch.Generator().manual_seed(0)
    sample = torch.randn(1, unet.config.in_channels, 8, 8, generator=g)
    text = torch.randn(1, 77, unet.config.cross_attention_dim, generator=g)

    def run() -> torch.Tensor:
        with torch.no_grad():
            return unet(sample, 10, text).sample

    def peft_layers() -> list:
        return [m for m in unet.modules() if isinstance(m, fuse.BaseTunerLayer)]

    unmerged, layers, before = run(), peft_layers(), _weights(pipe)
    undo = fuse.merge_exactly(unet, ["fuse-a", "fuse-b"], take_out=True)
    assert peft_layers() == []  # the base modules, merged in place, run in their stead
    assert not torch.equal(unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q.weight,
                           before["unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.base_layer.weight"])
    torch.testing.assert_close(run(), unmerged, rtol=1e-4, atol=1e-5)
    undo()
    assert peft_layers() == layers and torch.equal(run(), unmerged)
    after = _weights(pipe)
    assert all(torch.equal(before[k], after[k]) for k in before)
