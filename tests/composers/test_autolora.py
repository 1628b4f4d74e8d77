"""AutoLoRA gated fusion on the tiny SD1 pipeline with random (non-identity) adapters, and compose by prompt."""

from __future__ import annotations

import torch
from composer_helpers import add_random_adapter
from tiny_models import BUILDERS

import composers
from composers import AdapterSet, AutoLoRAConfig, MergeConfig
from composers.autolora import build_fusion, gate_key, time_features
from studio.library import Library


def _inputs(pipe) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    sample = torch.randn(2, 4, 16, 16, generator=g)  # (B, 4, h, w)
    ctx = torch.randn(2, 77, pipe.unet.config.cross_attention_dim, generator=g)  # (B, 77, D)
    return sample, torch.tensor(501), ctx


def _pipe():
    pipe = BUILDERS["sd1"]()
    add_random_adapter(pipe, "a", 1, kind="style", scale=0.6)
    add_random_adapter(pipe, "b", 2, kind="subject", scale=0.6)
    return pipe


def test_untrained_gates_are_the_uniform_merge_and_removal_is_exact() -> None:
    pipe = _pipe()
    pair = AdapterSet(["a", "b"], [1.0, 0.7])
    sample, t, ctx = _inputs(pipe)
    with torch.no_grad():
        before = pipe.unet(sample, t, ctx).sample
        with composers.apply(pipe, pair, "merge", MergeConfig()):
            merged = pipe.unet(sample, t, ctx).sample
        with composers.apply(pipe, pair, "autolora", AutoLoRAConfig(global_rank=0)) as handle:
            gated = pipe.unet(sample, t, ctx).sample
            assert handle.state["layers"] > 0 and handle.state["trained_layers"] == 0
        with composers.apply(pipe, pair, "autolora", AutoLoRAConfig(global_rank=2)):
            with_global = pipe.unet(sample, t, ctx).sample
        after = pipe.unet(sample, t, ctx).sample
    assert (merged - before).abs().max() > 1e-3  # the adapters do something
    torch.testing.assert_close(gated, merged, atol=1e-5, rtol=1e-4)  # g = 1/2, w_o = 2: h0 + sum_i d_i
    assert (with_global - merged).abs().max() > 1e-5  # the Global LoRA takes half of the sum's share
    torch.testing.assert_close(after, before, atol=0, rtol=0)


def test_trained_gates_load_and_follow_the_timestep(tmp_path) -> None:
    pipe = _pipe()
    pair = AdapterSet(["a", "b"], [1.0, 1.0]).resolve()
    sample, t, ctx = _inputs(pipe)
    with composers.apply(pipe, pair, "merge", MergeConfig()):
        fusion, _ = build_fusion(pipe, pair.names, AutoLoRAConfig())
    first = next(iter(fusion.gates))
    with torch.no_grad():
        for gate in fusion.gates.values():
            gate.beta.fill_(-4.0)  # mostly closed ...
            gate.w_t[:, 0].fill_(8.0)  # ... except where cos(pi t / 1000) is high: early (small t) steps
    path = tmp_path / "gate.safetensors"
    fusion.save(path)
    assert first == gate_key(first.replace("_", "."))
    outs = {}
    with torch.no_grad():
        base = pipe.unet(sample, t, ctx).sample
        with composers.apply(pipe, pair, "autolora", AutoLoRAConfig(gate=str(path), global_rank=0)) as handle:
            assert handle.state["trained_layers"] == len(fusion.gates)
            for step in (50, 950):
                outs[step] = pipe.unet(sample, torch.tensor(step), ctx).sample
            late = handle.state["phi"]
        with composers.apply(pipe, pair, "autolora", AutoLoRAConfig(global_rank=0)):
            open_950 = pipe.unet(sample, torch.tensor(950), ctx).sample
        plain_950 = pipe.unet(sample, torch.tensor(950), ctx).sample
    torch.testing.assert_close(late, time_features(torch.tensor(950.0)))
    assert (outs[950] - plain_950).abs().max() < 0.2 * (open_950 - plain_950).abs().max()  # gates nearly shut
    assert (outs[50] - pipe.unet(sample, torch.tensor(50), ctx).sample).abs().max() > 0 and base.isfinite().all()


def test_compose_by_prompt_retrieves_the_adapters_and_their_triggers() -> None:
    pipe = _pipe()
    lib = Library()
    for name, text in (("a", "a red star with stripes"), ("b", "a blue ring")):
        entry = lib.get(name)
        entry.meta.description = text
        lib.replace_meta(name, entry.meta)
    add_random_adapter(pipe, "c", 3)
    text, adapter_set, config = composers.from_options("a red star with stripes", "", "autolora")
    assert isinstance(config, AutoLoRAConfig) and config.k == 2
    assert adapter_set.names[0] == "a" and len(adapter_set.names) == 2
    assert text == "a red star with stripes, b"  # triggers not in the prompt yet are appended (a's, "a", is in it)


def test_the_global_lora_is_the_same_whatever_ran_before() -> None:
    """Its SVD is exact: a randomized one drew from the global RNG, and the images changed with the run's history."""
    pipe = _pipe()
    pair = AdapterSet(["a", "b"], [1.0, 0.7])
    sample, t, ctx = _inputs(pipe)
    outs = []
    with torch.no_grad():
        for seed in (0, 1):
            torch.manual_seed(seed)
            with composers.apply(pipe, pair, "autolora", AutoLoRAConfig(global_rank=2)):
                outs.append(pipe.unet(sample, t, ctx).sample)
    assert torch.equal(outs[0], outs[1])


def _gate_pipe():  # a tiny SD1 pipeline with two non-identity world adapters, "a" (an emblem) and "b" (a texture)
    pipe = BUILDERS["sd1"]()
    lib = Library()
    for name, seed, source in (("a", 1, {"world_emblem": 7}), ("b", 2, {"world_texture": "dots"})):
        add_random_adapter(pipe, name, seed, scale=0.6)
        entry = lib.get(name)
        lib.add(name, entry.state_dict(), entry.meta, train_config=source, overwrite=True)
    return pipe


def test_gate_training_moves_the_gates_and_ships_them(tmp_path) -> None:
    from composers.autolora_train import train_gate

    pipe = _gate_pipe()
    out = tmp_path / "gate.safetensors"
    summary = train_gate(pipe, ["a", "b"], steps=2, lr=1e-2, out=out, progress=False)
    assert out.is_file() and summary["layers"] > 0 and len(summary["last_losses"]) == 2
    from safetensors.torch import load_file

    state = load_file(str(out))
    assert any(k.endswith(".w_l") and v.abs().max() > 0 for k, v in state.items())  # moved off the merge init
    pair = AdapterSet(["a", "b"], [1.0, 1.0])
    with composers.apply(pipe, pair, "autolora", AutoLoRAConfig(gate=str(out))) as handle:
        assert handle.state["trained_layers"] == handle.state["layers"] == summary["layers"]
    assert not any("lora" in type(m).__name__.lower() for m in pipe.unet.modules())  # adapters unloaded


def test_gate_training_regresses_the_bases_own_target(tmp_path, monkeypatch) -> None:
    """The gates learn the base's prediction type (v here, as studio-tiny's), not always the noise."""
    from composers import autolora_train

    pipe = _gate_pipe()
    pipe.scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config, prediction_type="v_prediction")
    seen, real = [], autolora_train.training_target

    def shifted(scheduler, latents, noise, t):  # the real target, 10 away: the loss must show it
        seen.append(scheduler.config.prediction_type)
        return real(scheduler, latents, noise, t) + 10.0

    monkeypatch.setattr(autolora_train, "training_target", shifted)
    summary = autolora_train.train_gate(pipe, ["a", "b"], steps=1, out=tmp_path / "g.safetensors", progress=False)
    assert seen == ["v_prediction"]
    assert summary["first_losses"][0] > 50  # (pred - target - 10)^2 on both terms: the loss reads this target


def test_the_global_lora_from_stacked_factors_is_the_dense_svd() -> None:
    """The factor route (QR of the stacked B and A, SVD of the small core) gives the dense SVD's singular values and
    rank-q products, for linear and convolution LoRAs at different ranks and scales."""
    from peft import LoraConfig, inject_adapter_in_model
    from torch import nn

    from composers.autolora import _stacked_lora, _truncated_svd

    model = nn.Sequential(nn.Linear(24, 40), nn.Conv2d(6, 10, 3, padding=1))
    for name, rank in (("a", 3), ("b", 5)):
        inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=["0", "1"]), model, name)
    g = torch.Generator().manual_seed(0)
    for p in model.parameters():
        if p.requires_grad:
            p.data = torch.randn(p.shape, generator=g)  # non-identity: B is zero at init
    for layer in (model[0], model[1]):
        layer.set_adapter(["a", "b"])
        layer.scaling["b"] = 0.7 * layer.scaling["b"]  # a set weight on one of them
        assert _stacked_lora(layer, ["a", "b"]) is not None
        dense = (layer.get_delta_weight("a") + layer.get_delta_weight("b")).flatten(1)  # (out, in * kh * kw)
        u, s, v = _truncated_svd(layer, ["a", "b"])
        s_dense = torch.linalg.svdvals(dense)
        assert torch.allclose(s, s_dense[: s.numel()], rtol=1e-4, atol=1e-4)
        assert s_dense[s.numel():].abs().max() < 1e-3  # the sum's rank is the sum of the ranks
        for q in (2, 8):
            ud, sd, vhd = torch.linalg.svd(dense, full_matrices=False)
            expected = ud[:, :q] * sd[:q] @ vhd[:q]
            assert torch.allclose(u[:, :q] * s[:q] @ v[:, :q].T, expected, rtol=1e-4, atol=1e-3)
