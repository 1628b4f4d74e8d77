"""CMLoRA: the paper's refresh schedule and weights, Fourier ordering, and caching on the tiny pipelines."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from composer_helpers import add_random_adapter
from tiny_models import BUILDERS

import composers
from composers import AdapterSet, CMLoRAConfig
from composers.cmlora import dominance_weights, dominant_schedule, refresh_steps
from composers.frequency import frequency_order, frequency_shift, high_frequency_amplitude, profile_adapters
from studio.errors import StudioError
from studio.generate import GenerateConfig, generate


def _pipe_with_two():
    pipe = BUILDERS["sd1"]()
    add_random_adapter(pipe, "a", 1, kind="style")
    add_random_adapter(pipe, "b", 2, kind="subject")
    return pipe


def _inputs(pipe, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    sample = torch.randn(1, 4, 16, 16, generator=g).repeat(2, 1, 1, 1)  # (2B, 4, h, w): CFG duplicates latents
    ctx = torch.randn(2, 77, pipe.unet.config.cross_attention_dim, generator=g)  # [uncond, cond]
    return sample, ctx


def test_refresh_steps_follow_the_non_uniform_schedule() -> None:
    # Zou et al. §4.2: c1 = 2 on [0, 0.375T), c2 = 3 on [0.375T, 0.875T), c1 on [0.875T, T)
    assert refresh_steps(20) == [0, 2, 4, 6, 7, 10, 13, 16, 17, 19]
    steps = refresh_steps(200)
    assert [s for s in steps if s < 75] == list(range(0, 75, 2))
    assert [s for s in steps if 75 <= s < 175] == list(range(75, 175, 3))
    assert [s for s in steps if s >= 175] == list(range(175, 200, 2))
    assert refresh_steps(10, 1, 1) == list(range(10))  # interval 1: every step refreshes


def test_dominance_weights_and_turns() -> None:
    for n, (dom, nondom) in {2: (0.6, 0.4), 3: (0.5556, 0.2222), 5: (0.5294, 0.1176)}.items():
        w_d, w_nd = dominance_weights(n)
        assert w_d + (n - 1) * w_nd == pytest.approx(n)  # a weighted mean after the 1/N
        assert (w_d / n, w_nd / n) == pytest.approx((dom, nondom), abs=1e-4)
    refresh = refresh_steps(20)
    # high-frequency adapters take turns at each refresh; after 60% of the steps the window moves down one place
    dominant = dominant_schedule(20, ["h1", "h2"], ["low"], refresh, late=0.6)
    assert dominant[:8] == ["h1", "h1", "h2", "h2", "h1", "h1", "h2", "h1"]
    assert set(dominant[13:]) == {"h2", "low"} and "low" not in dominant[:13]
    assert set(dominant_schedule(20, ["x", "y"], [], refresh, late=0.6)) == {"x", "y"}  # no L: H throughout


def _synthetic_render(name: str | None, prompt: str, seed: int) -> torch.Tensor:
    """Known effects: `edges` adds a fine checkerboard (high frequency), `fine` a weaker fine grating, `wash` trades
    the base's grain for a broad smooth wave (low frequency)."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(64.0), torch.arange(64.0), indexing="ij")
    grain = 0.02 * torch.randn(64, 64, generator=g)
    image = 0.5 + 0.3 * torch.exp(-((yy - 32) ** 2 + (xx - 32) ** 2) / 200) + (grain if name != "wash" else 0)
    if name == "edges":
        image = image + 0.15 * ((yy + xx) % 2 * 2 - 1)  # period 2 px: the highest frequency
    if name == "fine":
        image = image + 0.05 * torch.sin(yy * math.pi / 2)  # period 4 px: high, weaker
    if name == "wash":
        image = image + 0.2 * torch.cos(2 * math.pi * xx / 64)  # one period across the image
    return image.clamp(0, 1).expand(3, -1, -1)  # (3, H, W)


def test_fourier_profile_orders_synthetic_adapters_by_their_high_frequency_effect() -> None:
    flat = torch.full((3, 32, 32), 0.5)
    checker = flat + 0.2 * ((torch.arange(32)[:, None] + torch.arange(32)) % 2 * 2 - 1)
    assert high_frequency_amplitude(checker) > high_frequency_amplitude(flat)
    prompts = dict.fromkeys(("wash", "edges", "fine"), "a prompt")
    shift = frequency_shift(_synthetic_render, prompts, seeds=2)
    assert shift["edges"] > shift["fine"] > 0 > shift["wash"]
    assert frequency_order(shift) == (["edges", "fine"], ["wash"])
    assert frequency_order({"p": -0.2, "q": -0.1}) == (["q"], ["p"])  # the high set is never empty


def test_profiling_a_pipeline_measures_each_adapter_once_per_cache(monkeypatch) -> None:
    import composers.frequency as frequency

    pipe = _pipe_with_two()
    with composers.apply(pipe, AdapterSet.parse("a,b"), "merge"):
        calls = []
        real = frequency.pipeline_render

        def counting(*args, **kwargs):
            render = real(*args, **kwargs)
            return lambda *a: calls.append(a) or render(*a)

        monkeypatch.setattr(frequency, "pipeline_render", counting)
        shift = profile_adapters(pipe, {"a": 1.0, "b": 1.0}, steps=2, seeds=1)
        assert set(shift) == {"a", "b"} and shift["a"] != shift["b"]
        assert len(calls) == 4  # per adapter: with it, and the base on its prompt
        assert profile_adapters(pipe, {"a": 1.0, "b": 1.0}, steps=2, seeds=1) == shift and len(calls) == 4
        profile_adapters(pipe, {"a": 0.5}, steps=2, seeds=1)  # another weight is another measurement
        assert len(calls) == 6


def _single(pipe, name: str, weight: float, sample, t, ctx, deep=None) -> torch.Tensor:
    """Adapter `name` alone; with `deep`, the last up block's input is replaced by it (a forward hook)."""
    hook = None
    if deep is not None:
        hook = pipe.unet.up_blocks[-2].register_forward_hook(lambda m, a, out: deep)
    with composers.apply(pipe, AdapterSet([name], [weight]), "merge"):
        out = pipe.unet(sample, t, ctx).sample
    if hook is not None:
        hook.remove()
    return out


def test_without_cache_cmlora_is_the_dominance_weighted_mean_of_per_adapter_predictions() -> None:
    pipe = _pipe_with_two()
    pipe.scheduler.set_timesteps(10)
    sample, ctx = _inputs(pipe, 0)
    t = pipe.scheduler.timesteps[0]  # step 0: the first of the order dominates
    config = CMLoRAConfig(cache=False, order=["b", "a"])
    with torch.no_grad():
        with composers.apply(pipe, AdapterSet.parse("a:0.8,b:0.6"), "cmlora", config) as handle:
            got = pipe.unet(sample, t, ctx).sample
        e_a, e_b = (_single(pipe, n, w, sample, t, ctx) for n, w in (("a", 0.8), ("b", 0.6)))
    w_d, w_nd = dominance_weights(2)
    assert (e_a - e_b).abs().max() > 1e-2  # the adapters really differ
    assert (got - (w_d * e_b + w_nd * e_a) / 2).abs().max() < 1e-5
    assert (got - (e_a + e_b) / 2).abs().max() > 1e-4  # not Composite's plain mean
    assert handle.state.history == [(0, "b", "full", True), (0, "a", "full", False)]


def test_cache_reuses_each_adapters_deep_features_between_refreshes() -> None:
    pipe = _pipe_with_two()
    pipe.scheduler.set_timesteps(20)
    t0, t1, t2 = pipe.scheduler.timesteps[:3]  # steps 0 (refresh), 1 (cached), 2 (refresh: a dominates)
    (s0, ctx), (s1, _), (s2, _) = _inputs(pipe, 0), _inputs(pipe, 1), _inputs(pipe, 2)
    runs = []
    probe = pipe.unet.mid_block.attentions[0].register_forward_pre_hook(lambda m, a: runs.append(1))
    with torch.no_grad():
        with composers.apply(pipe, AdapterSet.parse("a:0.8,b:0.6"), "cmlora", CMLoRAConfig(order=["b", "a"])) as h:
            outs = [pipe.unet(s, t, ctx).sample for s, t in ((s0, t0), (s1, t1), (s2, t2))]
        assert h.state.history == [(0, "b", "full", True), (0, "a", "full", False),
                                   (1, "b", "cached", True), (1, "a", "cached", False),
                                   (2, "b", "cached", False), (2, "a", "full", True)]
        assert len(runs) == 3  # the deep path ran only on the three full passes
        probe.remove()
        # the reference: each adapter's deep feature from step 0, substituted by a hook into a plain UNet pass
        deep = {}
        for name, w in (("a", 0.8), ("b", 0.6)):
            hook = pipe.unet.up_blocks[-2].register_forward_hook(lambda m, a, out, n=name: deep.__setitem__(n, out))
            _single(pipe, name, w, s0, t0, ctx)
            hook.remove()
        w_d, w_nd = dominance_weights(2)
        step1 = (w_d * _single(pipe, "b", 0.6, s1, t1, ctx, deep["b"])
                 + w_nd * _single(pipe, "a", 0.8, s1, t1, ctx, deep["a"])) / 2
        step2 = (w_nd * _single(pipe, "b", 0.6, s2, t2, ctx, deep["b"])
                 + w_d * _single(pipe, "a", 0.8, s2, t2, ctx)) / 2
        uncached = (w_d * _single(pipe, "b", 0.6, s1, t1, ctx) + w_nd * _single(pipe, "a", 0.8, s1, t1, ctx)) / 2
    assert (outs[1] - step1).abs().max() < 1e-5
    assert (outs[2] - step2).abs().max() < 1e-5
    assert (outs[1] - uncached).abs().max() > 1e-4  # reuse really changed the prediction


def test_a_run_profiles_composes_and_restores_the_pipeline() -> None:
    pipe = _pipe_with_two()
    config = GenerateConfig(prompt="a red star", steps=6, size="32x32")
    base = generate(config, pipe=pipe, output_type="np").images
    adapters = AdapterSet.parse("a:0.9,b:0.7")
    with composers.apply(pipe, adapters, "cmlora", CMLoRAConfig(profile_steps=2, profile_seeds=1)) as handle:
        first = generate(config, pipe=pipe, output_type="np").images
        history = list(handle.state.history)
        second = generate(config, pipe=pipe, output_type="np").images  # caches start over with each run
    again = generate(config, pipe=pipe, output_type="np").images
    assert sorted(handle.state.high + handle.state.low) == ["a", "b"] and set(handle.state.shift) == {"a", "b"}
    order = handle.state.high + handle.state.low
    full = [(s, n) for s, n, mode, _ in history if mode == "full"]
    # refresh steps of 6: 0, 2, 3, 5; step 0 runs both adapters in full, each other refresh only the dominant
    assert full[:2] == [(0, order[0]), (0, order[1])] and [s for s, _ in full[2:]] == [2, 5]
    assert np.array_equal(first, second)
    assert np.abs(first - base).max() > 1e-3
    assert np.array_equal(again, base)
    assert "forward" not in pipe.unet.__dict__ and "forward" not in pipe.unet.mid_block.__dict__
    with pytest.raises(StudioError, match="each adapter once"):
        composers.apply(pipe, adapters, "cmlora", CMLoRAConfig(order=["a"]))
    with pytest.raises(StudioError, match="--c1 and --c2"):
        CMLoRAConfig(c1=0)


def test_cli_options_reach_the_config_and_only_cmlora_takes_them() -> None:
    from studio.cli import build_parser

    argv = ["compose", "--prompt", "p", "--out", "x.png", "--composer", "cmlora",
            "--no-cache", "--c1", "1", "--c2", "4", "--order", "b,a"]
    args = build_parser(argv).parse_args(argv)
    assert (args.no_cache, args.c1, args.c2) == (True, 1, 4)
    config = composers.make_config("cmlora", {"cache": False, "c1": 1, "c2": 4, "order": ["b", "a"]})
    assert (config.cache, config.c1, config.c2, config.order) == (False, 1, 4, ["b", "a"])
    with pytest.raises(StudioError, match="--c1 does not apply to --composer merge"):
        composers.make_config("merge", {"c1": 1})
