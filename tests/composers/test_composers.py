"""Merge, LoRA Switch and LoRA Composite on the tiny pipelines with random (non-identity) adapters."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from composer_helpers import add_random_adapter
from tiny_models import BUILDERS

import composers
from composers import AdapterSet, MergeConfig, SwitchConfig, switch_index
from studio.errors import StudioError
from studio.generate import GenerateConfig, generate


def _unet_inputs(pipe, batch: int = 2, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    sample = torch.randn(1, 4, 16, 16, generator=g).repeat(batch, 1, 1, 1)  # (2B, 4, h, w): CFG duplicates latents
    ctx = torch.randn(batch, 77, pipe.unet.config.cross_attention_dim, generator=g)  # [uncond, cond]
    return sample, torch.tensor(501), ctx


def _pipe_with_two(kind: str = "sd1"):
    pipe = BUILDERS[kind]()
    add_random_adapter(pipe, "a", 1, kind="style")
    add_random_adapter(pipe, "b", 2, kind="subject")
    return pipe


def test_switch_index_follows_the_paper_rule() -> None:
    # Zhong et al. §2.2: i = floor(((t - 1) mod k tau) / tau) + 1 for 1-based step t and 1-based adapter i.
    assert [switch_index(s, 3, 2) for s in range(8)] == [0, 0, 1, 1, 2, 2, 0, 0]
    assert [switch_index(s, 2, 1) for s in range(4)] == [0, 1, 0, 1]
    for k in (1, 2, 3, 5):
        for tau in (1, 2, 5):
            for t in range(1, 40):
                assert switch_index(t - 1, k, tau) + 1 == ((t - 1) % (k * tau)) // tau + 1


def test_switch_activates_one_adapter_per_step_in_order() -> None:
    pipe = _pipe_with_two()
    add_random_adapter(pipe, "c", 3, kind="content")
    seen: list[list[str]] = []
    adapters = AdapterSet.parse("a:0.7,b,c:0.5")
    with composers.apply(pipe, adapters, "switch", SwitchConfig(tau=2, order=["c", "a", "b"])) as handle:
        probe = pipe.unet.get_submodule("down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q")
        hook = probe.register_forward_pre_hook(lambda m, a: seen.append(list(m.active_adapters)))
        generate(GenerateConfig(prompt="a red star", steps=7, size="32x32"), pipe=pipe, output_type="np")
        scales = [probe.scaling[n] / (probe.lora_alpha[n] / probe.r[n]) for n in ("a", "b", "c")]
    hook.remove()
    expected = ["c", "c", "a", "a", "b", "b", "c"]  # tau = 2, k = 3
    assert seen == [[n] for n in expected]  # exactly one adapter active at each UNet call
    assert handle.state.history == list(enumerate(expected))
    assert scales[2] == pytest.approx(0.5)  # the last step ran c at its own weight
    # default order: the subject first (the paper starts with the character), then style, then content
    assert composers.switch_order(AdapterSet.parse("c,a,b").resolve(), None) == ["b", "a", "c"]
    with pytest.raises(StudioError, match="each adapter once"):
        composers.apply(pipe, adapters, "switch", SwitchConfig(order=["a", "b"]))


def test_composite_equals_mean_of_per_adapter_guided_predictions() -> None:
    pipe = _pipe_with_two()
    adapters = AdapterSet.parse("a:0.8,b:0.6")
    sample, t, ctx = _unet_inputs(pipe)
    s = 7.5

    def guided(eps: torch.Tensor) -> torch.Tensor:
        uncond, cond = eps.chunk(2)
        return uncond + s * (cond - uncond)  # what the pipeline does with the UNet output

    with torch.no_grad():
        with composers.apply(pipe, adapters, "composite"):
            composite = guided(pipe.unet(sample, t, ctx, return_dict=False)[0])
            composite_obj = guided(pipe.unet(sample, t, ctx).sample)
        singles = []
        for name, weight in zip(adapters.names, adapters.weights):
            with composers.apply(pipe, AdapterSet([name], [weight]), "merge"):
                singles.append(guided(pipe.unet(sample, t, ctx).sample))
        with composers.apply(pipe, adapters, "merge"):
            merged = guided(pipe.unet(sample, t, ctx).sample)
    expected = torch.stack(singles).mean(0)  # (1/k) sum_i [e_i(z) + s (e_i(z, c) - e_i(z))]
    assert (singles[0] - singles[1]).abs().max() > 1e-2  # the adapters really differ
    assert (composite - expected).abs().max() < 1e-5
    assert torch.equal(composite, composite_obj)  # tuple and output-object forms agree
    assert (composite - merged).abs().max() > 1e-3  # composite is not the merge


@pytest.mark.parametrize("kind", ["sd1", "sdxl"])
def test_runtime_merge_equals_fused_merge(kind: str) -> None:
    pipe = _pipe_with_two(kind)
    adapters = AdapterSet.parse("a:0.8,b:-0.5")
    sample, t, ctx = _unet_inputs(pipe)
    kwargs = {}
    if kind == "sdxl":
        kwargs["added_cond_kwargs"] = {"text_embeds": torch.randn(2, 32), "time_ids": torch.zeros(2, 6)}
    layer_name = "mid_block.attentions.0.transformer_blocks.0.attn2.to_k"
    weight = pipe.unet.get_submodule(layer_name).weight.clone()
    with torch.no_grad():
        base = pipe.unet(sample, t, ctx, **kwargs).sample
        with composers.apply(pipe, adapters, "merge"):
            runtime = pipe.unet(sample, t, ctx, **kwargs).sample
        with composers.apply(pipe, adapters, "merge", MergeConfig(fused=True)):
            layer = pipe.unet.get_submodule(layer_name)
            assert layer.merged and not torch.equal(layer.base_layer.weight, weight)
            fused = pipe.unet(sample, t, ctx, **kwargs).sample
        after = pipe.unet(sample, t, ctx, **kwargs).sample
    assert runtime.dtype == torch.float32
    assert (runtime - base).abs().max() > 1e-2
    assert (fused - runtime).abs().max() <= 1e-5
    assert torch.equal(after, base)
    assert torch.equal(pipe.unet.get_submodule(layer_name).weight, weight)


@pytest.mark.parametrize("kind", ["sd1", "sdxl"])
def test_removing_a_composer_restores_the_pipeline_bit_for_bit(kind: str) -> None:
    pipe = _pipe_with_two(kind)
    config = GenerateConfig(prompt="a red star", steps=3, size="32x32")
    base = generate(config, pipe=pipe, output_type="np").images
    cases = [
        ("merge", MergeConfig()),
        ("merge", MergeConfig(fused=True)),
        ("switch", SwitchConfig(tau=1)),
        ("composite", None),
    ]
    for composer, composer_config in cases:
        handle = composers.apply(pipe, AdapterSet.parse("a:0.9,b:0.7"), composer, composer_config)
        composed = generate(config, pipe=pipe, output_type="np").images
        handle.remove()
        handle.remove()  # idempotent
        again = generate(config, pipe=pipe, output_type="np").images
        assert np.abs(composed - base).max() > 1e-3, composer
        assert np.array_equal(again, base), composer
        assert "forward" not in pipe.unet.__dict__
        assert not any("lora" in n for n, _ in pipe.unet.named_modules())


def test_apply_keeps_adapters_loaded_before_and_checks_inputs() -> None:
    from studio.library import load_adapters, loaded_adapters

    pipe = _pipe_with_two()
    load_adapters(pipe, ["a"], [0.3])
    with composers.apply(pipe, AdapterSet.parse("b"), "composite"):
        probe = next(m for n, m in pipe.text_encoder.named_modules() if n.endswith("layers.0.self_attn.q_proj"))
        assert probe.active_adapters == ["b"]  # only the set is active while composing
    assert loaded_adapters(pipe) == {"a": 0.3}
    assert probe.active_adapters == ["a"]
    with pytest.raises(StudioError, match="unknown composer"):
        composers.apply(pipe, AdapterSet.parse("b"), "blend")
    with pytest.raises(StudioError, match="takes a SwitchConfig"):
        composers.apply(pipe, AdapterSet.parse("b"), "switch", MergeConfig())
    with pytest.raises(StudioError, match="named twice"):
        AdapterSet.parse("a,a:0.5")
    with pytest.raises(StudioError, match="bad weight"):
        AdapterSet.parse("a:x")
    assert loaded_adapters(pipe) == {"a": 0.3}


def test_a_failed_apply_leaves_the_pipeline_clean() -> None:
    from studio.library import loaded_adapters

    pipe = _pipe_with_two()
    add_random_adapter(BUILDERS["sdxl"](), "xl", 4)  # SDXL shapes: refused by the SD1 pipeline when loaded
    with pytest.raises(StudioError, match="does not fit"):
        composers.apply(pipe, AdapterSet.parse("a,xl"), "merge")
    assert loaded_adapters(pipe) == {}
    assert not any("lora" in n for n, _ in pipe.unet.named_modules())
    with pytest.raises(StudioError, match="nobody"):
        composers.apply(pipe, AdapterSet.parse("a,nobody"), "merge")


def test_schedules_scale_the_merge_per_step() -> None:
    pipe = _pipe_with_two()
    scales: list[float] = []
    adapters = AdapterSet.parse("a:0.8")
    adapters.schedules = [composers.parse_schedule("linear:1:0")]
    with composers.apply(pipe, adapters, "merge"):
        probe = pipe.unet.get_submodule("down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q")
        unit = probe.lora_alpha["a"] / probe.r["a"]
        hook = probe.register_forward_pre_hook(lambda m, a: scales.append(m.scaling["a"] / unit))
        generate(GenerateConfig(prompt="a red star", steps=5, size="32x32"), pipe=pipe, output_type="np")
    hook.remove()
    assert scales == pytest.approx([0.8, 0.6, 0.4, 0.2, 0.0])
    with pytest.raises(StudioError, match="fused merge"):
        composers.apply(pipe, adapters, "merge", MergeConfig(fused=True))
    with pytest.raises(StudioError, match="unknown schedule"):
        composers.parse_schedule("cosine")
