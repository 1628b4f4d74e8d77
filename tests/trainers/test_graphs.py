"""`--cuda-graphs` for training: the recorded step is the UNet's prediction, used only where a recording follows it,
and on a GPU trains as plain launches do (also across a resume)."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch
from trainer_helpers import emblem, quick, tiny_pipe

from trainers import DreamBoothLoRA, DreamBoothLoRAConfig, Kronecker, train_loop
from trainers.graphs import TextStep, UNetStep, recorder, why_not
from trainers.loop import Loop


def _lora_pipe(kind: str) -> tuple[object, dict[str, torch.nn.Parameter]]:
    """A tiny pipeline with DreamBooth-LoRA attached (UNet and text encoders), B random so it is not the identity."""
    pipe, method = tiny_pipe(kind), DreamBoothLoRA()
    torch.manual_seed(0)
    pipe.unet.requires_grad_(False), pipe.text_encoder.requires_grad_(False)
    method.attach(pipe)
    tensors = method.trainable_tensors()
    for name, p in tensors.items():
        if "lora_B" in name:
            p.data.normal_(0, 0.1)
    return pipe, tensors


@pytest.mark.parametrize("kind", ["sd1", "sdxl"])
def test_the_recorded_callables_are_the_loops_embeddings_and_prediction_with_the_same_gradients(kind: str) -> None:
    """`TextStep` then `UNetStep` (what a GPU run records) against the prompt encoding generation uses and the
    UNet's own call, outputs and gradients (a UNet and a text-encoder LoRA tensor) exactly equal."""
    from studio.prompts import _encode_sd, _encode_sdxl, prompt_tokens

    pipe, tensors = _lora_pipe(kind)
    c = pipe.unet.config
    torch.manual_seed(1)
    zt = torch.randn(2, c.in_channels, c.sample_size, c.sample_size)  # (B, C, h, w)
    t = torch.tensor([10, 700])
    prompts = ["a sks emblem on the left", "a large red star"]
    time_ids = torch.tensor([[32.0, 32, 0, 0, 32, 32]] * 2)  # (B, 6)
    watched = [next(p for n, p in tensors.items() if n.startswith(part) and "lora_B" in n)
               for part in ("unet.", "text_encoder.")]

    def run(predict) -> list[torch.Tensor]:
        for p in watched:
            p.grad = None
        out = predict()
        (out.float() ** 2).mean().backward()
        return [out.detach()] + [p.grad.clone() for p in watched]

    def plain() -> torch.Tensor:
        if kind == "sd1":
            return pipe.unet(zt, t, _encode_sd(pipe, prompts, None)).sample
        hidden, pooled = _encode_sdxl(pipe, prompts, None)
        return pipe.unet(zt, t, hidden, added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample

    def recorded() -> torch.Tensor:
        embeds = TextStep(pipe)(*prompt_tokens(pipe, prompts))
        assert len(embeds) == (2 if kind == "sdxl" else 1)
        return UNetStep(pipe.unet)(zt, t, *embeds, *([time_ids] if kind == "sdxl" else []))

    expected, got = run(plain), run(recorded)
    assert all(x.abs().max() > 0 for x in expected)
    for a, b in zip(expected, got):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_why_not_names_what_a_recording_would_not_follow() -> None:
    pipe, gpu = _lora_pipe("sd1")[0], torch.device("cuda")  # only the device's type is read
    lora = DreamBoothLoRA()
    assert why_not(lora, pipe, gpu, 1, False) is None
    assert why_not(lora, pipe, torch.device("cpu"), 1, False) == "not on a CUDA GPU"
    assert "method Kronecker" in why_not(Kronecker(), pipe, gpu, 1, False)
    assert "--grad-accum 2" in why_not(lora, pipe, gpu, 2, False)
    assert "--gradient-checkpointing" in why_not(lora, pipe, gpu, 1, True)
    handle = pipe.unet.mid_block.register_forward_hook(lambda *args: None)  # a composer's or method's hook
    assert "forward hook on mid_block" in why_not(lora, pipe, gpu, 1, False)
    handle.remove()
    handle = pipe.text_encoder.get_input_embeddings().register_forward_hook(lambda *args: None)
    assert "forward hook on the text encoder's" in why_not(lora, pipe, gpu, 1, False)
    handle.remove()


def test_off_the_gpu_cuda_graphs_warns_once_and_trains_as_before(tmp_path: Path) -> None:
    config = quick(train_steps=3)
    assert recorder(DreamBoothLoRA(), tiny_pipe(), torch.device("cuda"), config) is None  # not asked for
    plain = train_loop(DreamBoothLoRA(), tiny_pipe(), emblem(), config, tmp_path / "plain")
    with pytest.warns(UserWarning, match="step runs without graphs: not on a CUDA GPU") as warned:
        asked = train_loop(DreamBoothLoRA(), tiny_pipe(), emblem(), quick(train_steps=3, cuda_graphs=True),
                           tmp_path / "asked")
    assert len([w for w in warned if "--cuda-graphs" in str(w.message)]) == 1
    assert asked.losses == plain.losses


def _emulated_run(run_dir: Path, recorded: bool, monkeypatch: pytest.MonkeyPatch, steps: int = 2, grad_accum: int = 1,
                  cancel: threading.Event | None = None, resume: bool = False, kind: str = "sd1"
                  ) -> tuple[Loop, DreamBoothLoRA]:
    """A CPU run whose training step goes through `GraphedStep` with the emulated recording (`graph_emulator`)."""
    import graph_emulator

    from trainers import Callbacks
    from trainers.graphs import GraphedStep

    monkeypatch.setattr(torch.cuda, "make_graphed_callables", graph_emulator.make_graphed_callables)
    method = DreamBoothLoRA(DreamBoothLoRAConfig(lr=1e-3, lora_dropout=0.1))  # dropout: the warm-up draws masks
    config = quick(train_steps=steps, batch_size=2, grad_accum=grad_accum, save_every=1)
    half = Callbacks(on_step=lambda step, loss: cancel.set() if step == steps // 2 else None) if cancel else None
    loop = Loop(method, tiny_pipe(kind), emblem(), config, run_dir, callbacks=half, cancel=cancel, resume=resume)
    if recorded:
        loop.graphs = GraphedStep(loop.pipe)
    loop.run()
    return loop, method


def _same_training(a: tuple[Loop, DreamBoothLoRA], b: tuple[Loop, DreamBoothLoRA]) -> bool:
    tensors_a, tensors_b = a[1].trainable_tensors(), b[1].trainable_tensors()
    return a[0].losses == b[0].losses and all(torch.equal(tensors_a[k], tensors_b[k]) for k in tensors_a)


def test_an_emulated_recording_trains_exactly_as_plain_launches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                                                ) -> None:
    """The loop's side of a recording (static buffers, gradients handed over by the backward replay, probes under
    no_grad between steps, the warm-up's dropout masks) changes nothing, also across a resume."""
    plain = _emulated_run(tmp_path / "plain", False, monkeypatch)
    recorded = _emulated_run(tmp_path / "recorded", True, monkeypatch)
    assert recorded[0].graphs.graphed is True and recorded[0].graphs.replays >= 2
    assert any(p.abs().max() > 0 for k, p in recorded[1].trainable_tensors().items() if "lora_B" in k)
    assert _same_training(plain, recorded)
    event = threading.Event()
    first = _emulated_run(tmp_path / "stopped", True, monkeypatch, cancel=event)
    assert first[0].step == 1
    resumed = _emulated_run(tmp_path / "stopped", True, monkeypatch, resume=True)
    assert resumed[0].step == 2 and _same_training(plain, resumed)


def test_an_emulated_recording_of_sdxl_trains_exactly_as_plain_launches(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """SDXL's step: two text encoders, the pooled embedding and the time ids through the recorded callables."""
    plain = _emulated_run(tmp_path / "plain", False, monkeypatch, steps=2, kind="sdxl")
    recorded = _emulated_run(tmp_path / "recorded", True, monkeypatch, steps=2, kind="sdxl")
    assert recorded[0].graphs.graphed is True and _same_training(plain, recorded)


def test_two_micro_steps_would_overwrite_each_others_recorded_gradients(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """Why `why_not` refuses --grad-accum above 1: the backward replay writes the same buffers every time."""
    plain = _emulated_run(tmp_path / "plain", False, monkeypatch, steps=2, grad_accum=2)
    recorded = _emulated_run(tmp_path / "recorded", True, monkeypatch, steps=2, grad_accum=2)
    assert plain[0].losses[0] == recorded[0].losses[0]  # the first step's losses come before any update
    assert not _same_training(plain, recorded)


def _gpu_run(kind: str, run_dir: Path, graphs: bool, steps: int = 6, cancel: threading.Event | None = None,
             resume: bool = False, dropout: float = 0.0) -> tuple[Loop, DreamBoothLoRA]:
    method = DreamBoothLoRA(DreamBoothLoRAConfig(lr=1e-3, lora_dropout=dropout))
    config = quick(device="cuda", train_steps=steps, batch_size=2, cuda_graphs=graphs, save_every=3)
    callbacks = None
    if cancel is not None:
        from trainers import Callbacks

        callbacks = Callbacks(on_step=lambda step, loss: cancel.set() if step == steps // 2 else None)
    loop = Loop(method, tiny_pipe(kind), emblem(), config, run_dir, callbacks=callbacks, cancel=cancel, resume=resume)
    loop.run()
    return loop, method


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["sd1", "sdxl"])
def test_recorded_steps_train_as_plain_launches_do(kind: str, tmp_path: Path) -> None:
    graphed, graphed_method = _gpu_run(kind, tmp_path / "graphs", True)
    plain, plain_method = _gpu_run(kind, tmp_path / "plain", False)
    assert graphed.graphs is not None and graphed.graphs.graphed and graphed.graphs.replays >= 6
    assert plain.graphs is None
    torch.testing.assert_close(torch.tensor(graphed.losses), torch.tensor(plain.losses), rtol=2e-2, atol=1e-3)
    a, b = graphed_method.trainable_tensors(), plain_method.trainable_tensors()
    assert any(p.abs().max() > 0 for k, p in a.items() if "lora_B" in k)  # trained away from the identity
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=2e-2, atol=2e-4, msg=name)


@pytest.mark.gpu
def test_a_recorded_run_resumes_to_the_same_result(tmp_path: Path) -> None:
    straight, straight_method = _gpu_run("sd1", tmp_path / "straight", True, dropout=0.1)  # RNG in the recording
    event = threading.Event()
    first, _ = _gpu_run("sd1", tmp_path / "stopped", True, cancel=event, dropout=0.1)
    assert first.step == 3
    resumed, resumed_method = _gpu_run("sd1", tmp_path / "stopped", True, resume=True, dropout=0.1)
    assert resumed.step == 6 and resumed.graphs.replays >= 3
    torch.testing.assert_close(torch.tensor(resumed.losses), torch.tensor(straight.losses), rtol=1e-5, atol=1e-6)
    for name, p in straight_method.trainable_tensors().items():
        torch.testing.assert_close(resumed_method.trainable_tensors()[name], p, rtol=1e-5, atol=1e-6, msg=name)
