"""Recorded CUDA-graph steps: used only where nothing alters the UNet between steps, and equal to plain launches."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from tiny_models import BUILDERS

from studio.cuda_graphs import eligible, graphed_unet
from studio.generate import GenerateConfig, generate


def test_a_plain_unet_is_eligible_and_a_composer_or_hook_is_not() -> None:
    from diffusers.models.attention_processor import AttnProcessor

    unet = BUILDERS["sd1"]().unet
    assert eligible(unet) is None
    handle = unet.down_blocks[0].register_forward_hook(lambda *args: None)
    assert "forward hook on down_blocks.0" in eligible(unet)
    handle.remove()

    class Masked(AttnProcessor):  # a composer's processor, e.g. region masks that change per step
        pass

    name = next(iter(unet.attn_processors))
    unet.set_attn_processor({n: Masked() if n == name else p for n, p in unet.attn_processors.items()})
    assert eligible(unet) == f"attention processor Masked at {name}"


def test_off_the_gpu_nothing_is_recorded() -> None:
    pipe = BUILDERS["sd1"]()
    with graphed_unet(pipe) as graphs:
        assert graphs is None and "forward" not in pipe.unet.__dict__


def test_a_recorded_generation_reads_nothing_back_from_the_device(tiny_dirs: dict,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """A whole call (prompt encoding, recorded DDIM steps, decoding) with the pipeline on the meta device, which holds
    no values: any read back (`.item()`, a tensor in an `if`, a copy to the host) raises. On a GPU each would make the
    host wait for the step to finish before queueing the next. A tagged call (the adapter loaded, merged in place and
    taken out) reads nothing either and replays the same recording. With plain launches DDIM's step reads its device
    timestep back (`host_timesteps` keeps them on the host while steps are recorded)."""
    import graph_tape
    from composer_helpers import add_random_adapter

    from studio.models import load_pipeline

    graph_tape.install(monkeypatch, meta=True)  # capture also refuses copies from the host
    model = str(tiny_dirs["sd1"])
    pipe = load_pipeline(model)  # its own copy: the cached pipeline stays on the CPU
    add_random_adapter(pipe, "meta-tag", seed=1)  # into the library
    pipe.to("meta")
    config = GenerateConfig(prompt="a large red star on the left", model=model, steps=3)
    images = generate(config, pipe=pipe, output_type="pt", free_memory=2**34).images
    recorder = pipe.unet.__dict__["_studio_graphs"]
    assert images.device.type == "meta" and recorder.replays == 3
    assert "set_timesteps" not in pipe.scheduler.__dict__
    tagged = dataclasses.replace(config, prompt=f"{config.prompt} <lora:meta-tag:0.8>")
    with graph_tape.MetaReads() as reads:
        generate(tagged, pipe=pipe, output_type="pt", free_memory=2**34)
    assert reads.places == [] and recorder.replays == 6 and len(recorder.graphs) == 1
    with pytest.raises(RuntimeError, match="meta tensors"):
        generate(dataclasses.replace(config, cuda_graphs=False), pipe=pipe, output_type="pt", free_memory=2**34)


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["sd1", "sdxl"])
def test_graphed_steps_equal_plain_launches_also_when_adapters_change(kind: str, tiny_dirs: dict) -> None:
    from peft import LoraConfig

    from studio.generate import cached_pipeline

    model = str(tiny_dirs[kind])
    pipe = cached_pipeline(model, "cuda")
    config = GenerateConfig(prompt="a large red star on the left", model=model, seed=3, steps=4, num_images=2,
                            device="cuda")

    def images(graphs: bool) -> np.ndarray:
        config.cuda_graphs = graphs
        return np.stack([np.asarray(i, dtype=np.int16) for i in generate(config, pipe=pipe).images])

    plain, graphed = images(False), images(True)
    recorder = pipe.unet.__dict__["_studio_graphs"]
    assert recorder.replays == 4 and len(recorder.graphs) == 1
    assert np.abs(plain - graphed).max() <= 1  # the same kernels, replayed
    assert "forward" not in pipe.unet.__dict__  # the UNet is itself again after the call

    lora = LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"], init_lora_weights=False)
    pipe.unet.add_adapter(lora, adapter_name="graph-a")  # random, non-identity weights
    try:
        for weight in (1.0, 0.5):  # a scale is baked into a recording: each weight is its own graph
            pipe.unet.set_adapters(["graph-a"], weights=[weight])
            with_adapter, graphed = images(False), images(True)
            assert np.abs(with_adapter - graphed).max() <= 1 and np.abs(with_adapter - plain).max() > 1
    finally:
        pipe.unet.delete_adapters("graph-a")
    assert len(recorder.graphs) == 3
    torch.cuda.synchronize()


def test_a_reloaded_adapter_is_a_new_recording_unless_merged(tiny_dirs: dict) -> None:
    """A graph reads an unmerged adapter's tensors by address; `<lora:...>` tags unload and load them every call."""
    from composer_helpers import add_random_adapter
    from peft.tuners.tuners_utils import BaseTunerLayer

    from studio.cuda_graphs import _adapter_state, tuner_layers
    from studio.generate import cached_pipeline
    from studio.library.load import load_adapters, unload_adapters

    pipe = cached_pipeline(str(tiny_dirs["sd1"]), "cpu")
    add_random_adapter(pipe, "graph-tag", seed=1)

    def loaded() -> tuple[tuple, list[torch.Tensor]]:
        load_adapters(pipe, ["graph-tag"], [0.8])
        held = [p for m in pipe.unet.modules() if isinstance(m, BaseTunerLayer) for p in m.lora_A.parameters()]
        return _adapter_state(tuner_layers(pipe.unet)), held  # `held` keeps the tensors' memory from being reused

    try:
        first, kept = loaded()
        assert _adapter_state(tuner_layers(pipe.unet)) == first  # the same adapter, the same recording
        unload_adapters(pipe, ["graph-tag"])
        second, _ = loaded()
        assert second != first  # loaded again: its tensors live elsewhere
        layers = [m for m in pipe.unet.modules() if isinstance(m, BaseTunerLayer)]
        for m in layers:
            m.merge()
        merged = _adapter_state(tuner_layers(pipe.unet))
        for m in layers:
            m.unmerge()
        unload_adapters(pipe, ["graph-tag"])
        loaded()
        layers = [m for m in pipe.unet.modules() if isinstance(m, BaseTunerLayer)]  # new layers after the reload
        for m in layers:
            m.merge()
        assert _adapter_state(tuner_layers(pipe.unet)) == merged  # merged, the graph reads only the base weights
        for m in layers:
            m.unmerge()
    finally:
        unload_adapters(pipe)
    assert kept


def test_a_composer_that_works_per_step_keeps_the_unet_off_recordings() -> None:
    """A recording replays one step's launches: it would bypass LoRA Switch's, Composite's, CMLoRA's and a scheduled
    merge's forward wrapper and freeze AutoLoRA's gated layers. Only a merge with fixed weights may be recorded."""
    from composer_helpers import add_random_adapter

    import composers
    from composers import AdapterSet, AutoLoRAConfig, MergeConfig, SwitchConfig

    pipe = BUILDERS["sd1"]()
    add_random_adapter(pipe, "graph-a", 1)
    add_random_adapter(pipe, "graph-b", 2)
    scheduled = AdapterSet.parse("graph-a:0.8,graph-b")
    scheduled.schedules = [composers.parse_schedule("linear:1:0"), composers.parse_schedule("constant")]
    cases = [("merge", MergeConfig(), None), ("merge", MergeConfig(fused=True), None),
             ("merge", None, "forward wrapper on the UNet"), ("switch", SwitchConfig(), "forward wrapper on the UNet"),
             ("composite", None, "forward wrapper on the UNet"),  # CMLoRA wraps it as they do
             ("autolora", AutoLoRAConfig(global_rank=0), "forward wrapper on ")]
    for composer, config, reason in cases:
        adapters = scheduled if composer == "merge" and config is None else AdapterSet.parse("graph-a:0.8,graph-b")
        with composers.apply(pipe, adapters, composer, config):
            found = eligible(pipe.unet)
            assert (found is None) if reason is None else (reason in (found or "")), (composer, config, found)
        assert eligible(pipe.unet) is None


def test_recordings_are_keyed_on_where_the_weights_live() -> None:
    """A merge in place keeps a recording valid; a model moved away and back lives elsewhere (an old recording would
    read freed memory)."""
    from studio.cuda_graphs import addresses

    unet = BUILDERS["sd1"]().unet
    first = addresses(unet)
    with torch.no_grad():
        unet.conv_in.weight.add_(1.0)  # what a merge does
    assert addresses(unet) == first
    kept = [t.data for t in (*unet.parameters(), *unet.buffers())]  # their memory is not reused by the move back
    unet.to(torch.float64).to(torch.float32)
    assert addresses(unet) != first and len(kept) > 0


def test_emulated_recordings_replay_plain_and_tagged_calls_and_follow_adapter_scales(
        tiny_dirs: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    """`graphed_unet` on the CPU with recordings emulated as operator tapes (`graph_tape`): a replay computes what
    plain launches compute; a tagged call (merged in place, the base modules running) replays the plain generation's
    recording; an unmerged adapter's scale is frozen into a recording, so each scale records its own."""
    import graph_tape
    from composer_helpers import add_random_adapter

    from studio.generate import cached_pipeline
    from studio.library.load import load_adapters, unload_adapters

    graph_tape.install(monkeypatch)
    model = str(tiny_dirs["sd1"])
    pipe = cached_pipeline(model, "cpu")
    config = GenerateConfig(prompt="a large red star on the left", model=model, seed=3, steps=3, num_images=2)

    def images(graphs: bool, prompt: str = config.prompt) -> np.ndarray:
        return generate(dataclasses.replace(config, cuda_graphs=graphs, prompt=prompt), pipe=pipe,
                        output_type="np").images

    plain, graphed = images(False), images(True)
    recorder = pipe.unet.__dict__["_studio_graphs"]
    assert recorder.replays == 3 and len(recorder.graphs) == 1
    np.testing.assert_allclose(graphed, plain, atol=1e-6)
    assert "forward" not in pipe.unet.__dict__

    add_random_adapter(pipe, "tape-a", seed=1, scale=0.4)
    tagged = f"{config.prompt} <lora:tape-a:0.8>"
    with_tag, graphed = images(False, tagged), images(True, tagged)
    assert len(recorder.graphs) == 1 and recorder.replays == 6  # the plain recording, replayed
    np.testing.assert_allclose(graphed, with_tag, atol=1e-6)
    assert np.abs(with_tag - plain).max() > 1e-3
    try:
        for weight in (1.0, 0.5):
            load_adapters(pipe, ["tape-a"], [weight])  # unmerged: PEFT's scale is a number in the recording
            with_adapter, graphed = images(False), images(True)
            np.testing.assert_allclose(graphed, with_adapter, atol=1e-6)
            assert np.abs(with_adapter - plain).max() > 1e-3
    finally:
        unload_adapters(pipe)
    assert len(recorder.graphs) == 3


def test_a_step_that_cannot_be_recorded_runs_with_plain_launches(tiny_dirs: dict,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """A composer that vouched for its step but waits on the device inside it (here `float(tensor)`, refused while
    recording as CUDA refuses it): a warning, then plain launches for that step's shape, and the same image."""
    import graph_tape

    from composers.activation import wrap_forward
    from studio.cuda_graphs import recordable, step_runner
    from studio.generate import cached_pipeline

    graph_tape.install(monkeypatch)
    model = str(tiny_dirs["sd1"])
    pipe = cached_pipeline(model, "cpu")
    config = GenerateConfig(prompt="a large red star on the left", model=model, seed=3, steps=2)
    plain = generate(dataclasses.replace(config, cuda_graphs=False), pipe=pipe, output_type="np").images
    conv = pipe.unet.conv_in
    conv.forward = lambda x: torch.nn.Conv2d.forward(conv, x) + 0 * float(x.abs().max())  # a host sync
    undo = [wrap_forward(pipe.unet, lambda original, *a, **kw: step_runner(pipe.unet, original)(*a, **kw)),
            recordable(pipe.unet, lambda: ())]
    earlier = pipe.unet.__dict__.get("_studio_graphs")  # the cached pipeline may hold other tests' recordings
    replays = 0 if earlier is None else earlier.replays
    try:
        with pytest.warns(UserWarning, match="could not be recorded"):
            graphed = generate(config, pipe=pipe, output_type="np").images
        recorder = pipe.unet.__dict__["_studio_graphs"]
        assert len(recorder.failed) == 1 and recorder.replays == replays
        assert not [key for key in recorder.graphs if key[-1] is not None]  # nothing recorded for the composer
        assert "synchronises with the host" in next(iter(recorder.failed.values()))
    finally:
        for step in reversed(undo):
            step()
        del conv.forward
    np.testing.assert_allclose(graphed, plain, atol=1e-6)
    assert not recorder.failed  # gone with the composer's installation
