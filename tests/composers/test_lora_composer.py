"""LoRA-Composer on the tiny pipelines with random (non-identity) adapters: region injection, isolation, latent
re-initialisation and guidance, exact removal, and the CLI's boxes."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import pytest
import torch
from composer_helpers import add_random_adapter
from diffusers.models.attention_processor import AttnProcessor2_0
from peft import LoraConfig
from tiny_models import BUILDERS

import composers
from composers import AdapterSet, LoraComposerConfig, parse_boxes
from composers.activation import activate
from composers.concepts import split_concepts, token_group
from composers.lora_composer import reinitialise
from composers.region_attention import RegionState
from composers.region_lora import RegionMasks, StackedDeltas, install_region_deltas, set_scales
from studio.cli import main
from studio.errors import StudioError
from studio.generate import GenerateConfig, generate
from studio.library import load_adapters
from studio.prompts import encode_prompt


PROMPT = "a large qa emblem on the left and a large qb emblem on the right on a white background"
BOXES = {"qa": (0.0, 0.0, 0.5, 1.0), "qb": (0.5, 0.0, 1.0, 1.0)}


def _pipe(kind: str = "sd1"):
    pipe = BUILDERS[kind]()
    add_random_adapter(pipe, "qa", 1, kind="subject", scale=0.5)
    add_random_adapter(pipe, "qb", 2, kind="subject", scale=0.5)
    return pipe


def _config(**kw) -> LoraComposerConfig:
    return LoraComposerConfig(boxes=dict(BOXES), **kw).for_prompt(PROMPT)


def test_region_prompts_and_token_groups_come_from_the_prompt() -> None:
    tok = _pipe().tokenizer  # and the adapters in the library, whose trigger words name the concepts
    config = _config()
    assert config.region_prompts == {"qa": "a large qa emblem on the left on a white background",
                                     "qb": "a large qb emblem on the right on a white background"}
    one = "a large qa emblem on the left and a small blue circle on the right on a white background"
    concepts = split_concepts(one, {"qa": ["qa"]})
    assert [[one.split()[i] for i in c.keys] for c in concepts] == [["qa", "emblem"], ["blue", "circle"]]
    assert [c.adapters for c in concepts] == [["qa"], []]
    ids = tok(one).input_ids
    assert tok.decode([ids[i] for i in token_group(tok, one, concepts[1].keys)]) == "blue circle"
    assert parse_boxes(["qa:0,0.1,0.5,0.9"]) == {"qa": (0.0, 0.1, 0.5, 0.9)}
    for bad in (["qa:0,0,1"], ["qa"], ["qa:0,0,a,1"]):
        with pytest.raises(StudioError, match="NAME:x0,y0,x1,y1"):
            parse_boxes(bad)
    with pytest.raises(StudioError, match="x0 < x1"):
        LoraComposerConfig(boxes={"qa": (0.6, 0, 0.5, 1)})


def test_cross_attention_is_the_concepts_own_inside_its_box_and_the_base_outside() -> None:
    pipe = _pipe()
    unet = pipe.unet
    name = "down_blocks.0.attentions.0.transformer_blocks.0.attn2"
    attn = unet.get_submodule(name)
    g = torch.Generator().manual_seed(0)
    hs = torch.randn(2, 256, attn.to_q.in_features, generator=g)  # (B, 16*16, C)
    ctx = torch.randn(2, 77, attn.to_k.in_features, generator=g)  # the global prompt
    load_adapters(pipe, ["qa", "qb"], [1.0, 0.7])  # loaded before, so they stay for the reference below
    with composers.apply(pipe, AdapterSet.parse("qa,qb:0.7"), "lora_composer", _config(guidance=False)) as h:
        h.state.regions.latent_hw = (16, 16)
        out = attn(hs, encoder_hidden_states=ctx)  # (B, L, C)
        region = [e.expand(2, -1, -1) for e in h.state.region_embeds]
    left = torch.zeros(16, 16, dtype=torch.bool)
    left[:, :8] = True
    left = left.flatten()
    base_proc = AttnProcessor2_0()
    with torch.no_grad():
        activate(unet, {})  # adapters off: the base
        for model in (pipe.text_encoder,):
            activate(model, {"qa": 1.0})
        want_region = encode_prompt(pipe, _config().region_prompts["qa"], None, guidance=False).prompt_embeds
        activate(unet, {"qa": 1.0})  # adapter qa alone, everywhere: Eq. 2-3 inside its box
        inside = base_proc(attn, hs, region[0])
        activate(unet, {"qb": 0.7})
        inside_b = base_proc(attn, hs, region[1])
    assert torch.allclose(region[0][:1], want_region, atol=1e-6)  # P^n through concept n's text encoder
    assert torch.allclose(out[:, left], inside[:, left], atol=1e-5)
    assert torch.allclose(out[:, ~left], inside_b[:, ~left], atol=1e-5)
    assert not torch.allclose(inside[:, ~left], inside_b[:, ~left], atol=1e-3)  # the adapters differ there
    activate(unet, {"qa": 1.0, "qb": 0.7})


def test_isolation_hides_the_other_box_from_a_concepts_queries() -> None:
    pipe = _pipe()
    attn = pipe.unet.get_submodule("down_blocks.0.attentions.0.transformer_blocks.0.attn1")
    g = torch.Generator().manual_seed(1)
    hs = torch.randn(1, 256, attn.to_q.in_features, generator=g)
    box_b = torch.zeros(16, 16, dtype=torch.bool)
    box_b[:, 8:] = True
    box_b = box_b.flatten()
    moved = hs.clone()
    moved[:, box_b] += torch.randn(1, int(box_b.sum()), hs.shape[-1], generator=g)
    for isolation in (True, False):
        with composers.apply(pipe, AdapterSet.parse("qa,qb"), "lora_composer", _config(isolation=isolation)) as h:
            h.state.regions.latent_hw = (16, 16)
            a, b = attn(hs), attn(moved)
        same = torch.allclose(a[:, ~box_b], b[:, ~box_b], atol=1e-5)  # box qa's queries (and only those)
        assert same == isolation, isolation


def test_reinitialisation_moves_the_best_window_into_the_box_and_keeps_the_statistics() -> None:
    regions = RegionMasks([(0.0, 0.0, 0.5, 0.5)])
    regions.latent_hw = (8, 8)
    state = RegionState(["qa"], regions, [], 0, {})
    cross = torch.full((1, 64, 77), 1e-3)
    peak = torch.zeros(8, 8)
    peak[4:8, 4:8] = 1  # the concept attends to the bottom-right quarter
    cross[0, :, 2] = peak.flatten()
    state.cross = [[cross]]
    z = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(2))
    out = reinitialise(z, state, (8, 8), [[2]], [5])
    patched = z.clone()
    patched[..., :8, :8] = z[..., 8:, 8:]  # the window's latent patch (latent = 2 x the 8x8 maps) in the box
    assert torch.allclose((out - out.mean()) / out.std(), (patched - patched.mean()) / patched.std(), atol=1e-5)
    assert torch.allclose(out.mean(), z.mean(), atol=1e-5) and torch.allclose(out.std(), z.std(), atol=1e-5)


def test_masks_are_made_once_on_the_latents_device_and_dtype() -> None:
    """What every step reads (box masks, the isolation mask) is built once where the latents are: on a GPU a copy
    from the host at every call waits for it."""
    regions = RegionMasks([(0.0, 0.0, 0.5, 1.0), (0.5, 0.0, 1.0, 1.0)])
    regions.latent_hw = (8, 8)
    state = RegionState(["qa", "qb"], regions, [], 0, {})
    like = torch.zeros(1, 64, 4, dtype=torch.float64)
    mask = state.isolation(64, like)  # (L, L)
    assert mask.dtype == torch.float64 and state.isolation(64, like) is mask
    assert mask[0, 7].item() == float("-inf") and mask[0, 3].item() == 0  # a left cell cannot see a right cell
    boxes = regions.at((8, 8), like)
    assert boxes.dtype == torch.float64 and regions.at((8, 8), like) is boxes
    assert torch.equal(boxes, regions.at((8, 8)).double())
    assert regions.for_output(like).dtype == torch.float64  # (N, 1, L, 1), a view of the kept masks


@pytest.mark.parametrize("kind", ["sd1", "sdxl"])
def test_generation_is_guided_and_removal_restores_the_pipeline(kind: str) -> None:
    pipe = _pipe(kind)
    config = GenerateConfig(prompt=PROMPT, steps=4, size="32x32", num_images=2)
    before = generate(config, pipe=pipe, output_type="np").images
    adapters = AdapterSet.parse("qa,qb")
    plain = composers.compose(config, adapters, "lora_composer", _config(guidance=False, reinit=False), pipe=pipe,
                              output_type="np")
    with composers.apply(pipe, adapters.resolve(), "lora_composer", _config(guidance=True)) as handle:
        guided = generate(config, pipe=pipe, output_type="np").images
        assert handle.state.names == ["qa", "qb"]
    assert np.isfinite(guided).all() and np.abs(guided - plain.images).max() > 1e-3  # guidance moved the latents
    merged = composers.compose(config, adapters, "merge", pipe=pipe, output_type="np").images
    assert np.abs(plain.images - merged).max() > 1e-3
    assert plain.params[0]["composer_config"]["boxes"]["qa"] == (0.0, 0.0, 0.5, 1.0)
    assert np.array_equal(generate(config, pipe=pipe, output_type="np").images, before)


def test_cli_takes_boxes(tiny_dirs, tmp_path, capsys) -> None:
    from PIL import Image

    from studio.models import load_pipeline
    from studio.pnginfo import read_parameters

    model = str(tiny_dirs["sd1"])
    pipe = load_pipeline(model)
    add_random_adapter(pipe, "qa", 1, kind="subject")
    add_random_adapter(pipe, "qb", 2, kind="subject")
    out = tmp_path / "lc.png"
    common = ["--model", model, "--steps", "2", "--size", "32x32", "--prompt", PROMPT, "--adapters", "qa,qb"]
    assert main(["compose", *common, "--composer", "lora_composer", "--box", "qa:0,0.25,0.5,0.75", "--box",
                 "qb:0.5,0.25,1,0.75", "--out", str(out)]) == 0
    params = read_parameters(out)
    assert params["composer"] == "lora_composer" and params["composer_config"]["boxes"]["qb"] == [0.5, 0.25, 1, 0.75]
    assert params["composer_config"]["region_prompts"]["qb"].startswith("a large qb emblem on the right")
    capsys.readouterr()
    words = tmp_path / "words.png"  # no --box: the same boxes from "on the left" and "on the right"
    assert main(["compose", *common, "--composer", "lora_composer", "--out", str(words)]) == 0
    assert "tip:" not in capsys.readouterr().err
    assert main(["compose", *common, "--out", str(tmp_path / "merged.png")]) == 0  # merge: every adapter everywhere
    assert "tip: the prompt places qa, qb; --composer lora_composer" in capsys.readouterr().err
    assert read_parameters(words)["composer_config"]["boxes"] == params["composer_config"]["boxes"]
    assert np.array_equal(np.asarray(Image.open(words)), np.asarray(Image.open(out)))
    capsys.readouterr()
    unplaced = ["--prompt", "a large qa emblem and a large qb emblem"]
    for flags, message in [(["--composer", "lora_composer", *unplaced], "or a place in the subject's clause"),
                           (["--composer", "lora_composer", "--box", "qc:0,0,1,1"], "qc"),
                           (["--composer", "lora_composer", "--box", "qa:0,0,1"], "NAME:x0,y0,x1,y1")]:
        assert main(["compose", *common, *flags, "--out", str(out)]) == 2
        assert message in capsys.readouterr().err


def test_stacked_region_deltas_equal_each_concepts_delta_in_its_box(monkeypatch) -> None:
    unet = BUILDERS["sd1"]().unet
    for name in ("qa", "qb"):  # random A and B on convolutions and projections (PEFT's non-identity init)
        targets = ["conv2", "to_q", "to_v", "proj_in"] + (["conv1"] if name == "qb" else [])  # conv1: qb's alone
        unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights=False, target_modules=targets),
                         adapter_name=name)
    set_scales(unet, {"qa": 1.0, "qb": 0.7})
    activate(unet, {})  # the adapters act only through the hooks
    regions = RegionMasks([(0.0, 0.0, 0.6, 1.0), (0.4, 0.2, 1.0, 0.9)])  # overlapping, so shares are averaged
    g = torch.Generator().manual_seed(3)
    x, t = torch.randn(2, 4, 16, 16, generator=g), torch.tensor(400)
    ctx = torch.randn(2, 77, unet.config.cross_attention_dim, generator=g)
    outs = []
    layers = dict(unet.named_modules())
    probe = "down_blocks.0.resnets.0.conv1"
    with torch.no_grad():
        untrack = regions.track(unet)
        base = unet(x, t, ctx).sample
        for stacked in (True, False):
            monkeypatch.setattr(StackedDeltas, "fits", staticmethod(lambda layer, names, s=stacked: s))
            handle = install_region_deltas(unet, ["qa", "qb"], regions, lambda n: n.endswith("attn2.to_v"))
            # stacked, with no adapter active through PEFT: the base layer runs itself, its deltas hooked on
            assert (unet.get_submodule(probe) is layers[probe].base_layer) == stacked
            outs.append(unet(x, t, ctx).sample)
            handle.remove()
            assert all(unet.get_submodule(p) is m for p, m in layers.items())  # every PEFT layer back in place
        untrack()
    assert not torch.allclose(outs[0], base, atol=1e-3)
    torch.testing.assert_close(outs[0], outs[1], atol=1e-5, rtol=1e-4)  # two calls equal the per-concept sum


@pytest.mark.parametrize("kind", ["sd1", "sdxl", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_isolated_self_attention_through_the_fused_projection_equals_the_hooked_layers(kind: str, monkeypatch) -> None:
    """q, k, v and the output of every self-attention with S[t, n] = box n's share equal the base layers with their
    stacked deltas hooked on, at every layer and step, the guidance's backward included. (Whole images are no test
    here: a relative 1e-6 in one attention output moves this random tiny model's image by 0.07.)"""
    from composers.region_attention import IsolatedSelfAttnProcessor

    attend, worst, fused = IsolatedSelfAttnProcessor.attend, [], []

    def both(self, attn, hs, context, mask):  # noqa: ANN001, ANN202
        out = attend(self, attn, hs, context, mask)
        fused.append(self._fused(attn, hs) is not None)
        packs, self._packs = self._packs, {(hs.dtype, hs.device): None}  # the hooked layers for once
        try:
            hooked = attend(self, attn, hs, context, mask)
        finally:
            self._packs = packs
        worst.append(float((out - hooked).abs().max() / hooked.abs().max()))
        return out

    monkeypatch.setattr(IsolatedSelfAttnProcessor, "attend", both)
    monkeypatch.setattr(IsolatedSelfAttnProcessor, "fused", "auto" if kind == "cuda" else "always")
    norms = []  # on CUDA the isolated GroupNorms run as one Triton kernel each, where no gradient is asked
    if kind == "cuda":
        from lora_kernels import triton_group_norm

        kernel = triton_group_norm.region_group_norm
        monkeypatch.setattr(triton_group_norm, "region_group_norm", lambda *a: norms.append(1) or kernel(*a))
    pipe = _pipe("sd1" if kind == "cuda" else kind).to("cuda" if kind == "cuda" else "cpu")  # on CUDA: Triton
    config = GenerateConfig(prompt=PROMPT, steps=2, size="32x32", seed=5, device=str(pipe.device))
    image = composers.compose(config, AdapterSet.parse("qa,qb"), "lora_composer", _config(guidance=True),
                              pipe=pipe, output_type="np").images
    assert fused and all(fused)  # every attn1 projection is a bare base layer with its stacked deltas
    assert max(worst) < (2e-3 if kind == "cuda" else 1e-5) and np.isfinite(image).all()  # Triton's fp32 dot: TF32
    assert bool(norms) == (kind == "cuda")


def test_recorded_steps_compose_as_plain_launches_and_go_with_the_composer(monkeypatch: pytest.MonkeyPatch) -> None:
    """LoRA-Composer's steps recorded as CUDA graphs (emulated as operator tapes on the CPU, `graph_tape`: Python
    frozen at the recording, host syncs refused) compose what plain launches do: the steps and the re-initialisation's
    forward at step 0 (its attention maps handed back after each replay), one recording each. The installation is kept
    for the next call with the same inputs, which replays them; other settings make a new installation and the old
    one's recordings go; with latent guidance (autograd) nothing is recorded."""
    import graph_tape

    graph_tape.install(monkeypatch)
    pipe = _pipe()
    config = GenerateConfig(prompt=PROMPT, steps=4, size="32x32", num_images=2, seed=5)

    def composed(graphs: bool, seed: int = 5, **kw: Any) -> np.ndarray:
        run = dataclasses.replace(config, cuda_graphs=graphs, seed=seed)
        return composers.compose(run, AdapterSet.parse("qa,qb"), "lora_composer", _config(**kw), pipe=pipe,
                                 output_type="np").images

    plain, recorded = composed(False), composed(True)  # the second call keeps the first one's installation
    recorder = pipe.unet.__dict__["_studio_graphs"]
    assert recorder.replays == 5 and len(recorder.graphs) == 2 and not recorder.failed  # 4 steps, 1 capture
    np.testing.assert_allclose(recorded, plain, atol=1e-6)
    assert "_studio_recordable" not in pipe.unet.__dict__ and "forward" not in pipe.unet.__dict__
    other = composed(False, seed=6)  # other latents: other maps, read from the replayed capture
    np.testing.assert_allclose(composed(True, seed=6), other, atol=1e-6)
    assert recorder.replays == 10 and len(recorder.graphs) == 2  # the same recordings, replayed
    assert np.abs(other - plain).max() > 1e-3
    composed(True, guidance=True)
    assert recorder.replays == 10 and not recorder.graphs  # guided steps run plain; the old recordings went


def test_a_repeated_regional_call_reads_back_only_its_window_choice(monkeypatch: pytest.MonkeyPatch) -> None:
    """LoRA-Composer's recorded calls with the pipeline on the meta device (standing in for a GPU: no values, so a
    read back or a copy from the host shows; `graph_tape` refuses both while a step is captured, as CUDA does). The
    first call records its steps and its capture forward, nothing refused; the second, kept, reads back only the
    re-initialisation's window per concept and image (§3.5: a place on the host) and replays everything else."""
    import graph_tape

    graph_tape.install(monkeypatch, meta=True)
    pipe = _pipe()
    load_adapters(pipe, ["qa", "qb"], [1.0, 1.0])  # into the CPU model, then all of it onto the meta device
    pipe.to("meta")
    config = GenerateConfig(prompt=PROMPT, steps=1, size="32x32", device="meta")
    monkeypatch.setattr("studio.generate.resolve_device", lambda device: device)
    reads = []
    for _ in range(2):
        with graph_tape.MetaReads() as audit:
            composers.compose(config, AdapterSet.parse("qa,qb"), "lora_composer", _config(), pipe=pipe,
                              output_type="pt")
        reads.append(audit.places)
    recorder = pipe.unet.__dict__["_studio_graphs"]
    assert not recorder.failed and len(recorder.graphs) == 2 and recorder.replays == 4  # 1 step + 1 capture, x2
    assert len(reads[1]) == 2 and all(place.startswith("lora_composer.py") for place in reads[1])  # 2 concepts


def test_an_installation_is_kept_only_for_the_same_adapter_tensors() -> None:
    """What decides whether a LoRA-Composer installation serves the next call: the set, the settings, and the
    adapters' very tensors as they are (an adapter changed in place, e.g. trained further, or a new tensor with the
    same values, perhaps at a freed one's address, is new)."""
    from composers.lora_composer import _Inputs

    pipe = _pipe()
    load_adapters(pipe, ["qa", "qb"], [1.0, 1.0])
    pair, config = AdapterSet.parse("qa,qb"), _config()
    first = _Inputs(pipe, pair, config)
    assert _Inputs(pipe, pair, config) == first
    assert _Inputs(pipe, AdapterSet.parse("qa:0.5,qb"), config) != first
    assert _Inputs(pipe, pair, dataclasses.replace(config, isolate_norms=False)) != first
    up = pipe.unet.get_submodule("down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q").lora_B["qb"]
    with torch.no_grad():
        up.weight.mul_(2)
    second = _Inputs(pipe, pair, config)
    assert second != first
    version = up.weight._version
    up.weight = torch.nn.Parameter(up.weight.detach().clone(), requires_grad=False)  # the same values, a new tensor
    with torch.no_grad():
        while up.weight._version < version:  # at the version of the one it replaced
            up.weight.mul_(1)
    assert _Inputs(pipe, pair, config).versions == second.versions and _Inputs(pipe, pair, config) != second
