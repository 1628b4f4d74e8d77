"""Methods: Kronecker equals PEFT LoKr, trained adapters round-trip through the library on SD1 / SD2 / SDXL."""

from __future__ import annotations

import dataclasses
import json
import warnings
from pathlib import Path

import pytest
import torch
from peft import LoKrConfig, inject_adapter_in_model, set_peft_model_state_dict
from toy_methods import FrozenDown, SparseMasked
from trainer_helpers import quick, tiny_pipe

from studio.errors import StudioError
from studio.generate import GenerateConfig, generate
from studio.library import CheckpointMismatchWarning, Library, delta_weight, load_adapters
from studio.models import load_pipeline
from trainers import DreamBoothLoRAConfig, Kronecker, KroneckerConfig, configs_from_mapping, train
from trainers.method import TEXT_TARGETS
from trainers.methods.kronecker import KronAdd, KronDelta, kron


def _unet_inputs(pipe) -> tuple:  # noqa: ANN001
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 16, 16, generator=g)
    ctx = torch.randn(2, 77, pipe.unet.config.cross_attention_dim, generator=g)
    return x, torch.tensor([10, 700]), ctx


@pytest.mark.parametrize("factor", [16, 4, -1])
def test_kronecker_equals_peft_lokr(factor: int) -> None:
    ours, ref = tiny_pipe(), tiny_pipe()  # same seeded weights
    x, t, ctx = _unet_inputs(ours)
    with torch.no_grad():
        base = ref.unet(x, t, ctx).sample
    method = Kronecker(KroneckerConfig(factor=factor))
    method.attach(ours)
    with torch.no_grad():
        assert torch.equal(ours.unet(x, t, ctx).sample, base), "a fresh Kronecker adapter (B = 0) is the identity"
        g = torch.Generator().manual_seed(1)
        for p in method.trainable_tensors().values():  # non-identity weights in both factors
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    tensors, meta = method.export()
    r = max(meta.ranks.values())
    targets = [t.strip() for t in KroneckerConfig().target_modules.split(",")]
    peft_layers = set()
    for component, names in (("unet", targets), ("text_encoder", TEXT_TARGETS.split(","))):  # text: the default
        model = getattr(ref, component)
        inject_adapter_in_model(LoKrConfig(r=r, alpha=r, decompose_factor=factor, target_modules=names), model)
        own = {k.removeprefix(f"{component}."): v for k, v in tensors.items() if k.startswith(f"{component}.")}
        result = set_peft_model_state_dict(model, own)
        assert not [k for k in result.missing_keys if "lokr" in k] and not result.unexpected_keys
        peft_layers |= {f"{component}.{n}" for n, m in model.named_modules() if "default" in getattr(m, "lokr_w1", {})}
    deltas = method.delta_weights()
    assert set(deltas) == peft_layers and sum(m.startswith("unet.") for m in deltas) >= 88  # q, k, v, out x 11+
    assert any(m.startswith("text_encoder.") for m in deltas)
    assert any(dw.dim() == 4 for dw in deltas.values()) == ("conv1" in targets)  # ResNet 3x3 convolutions
    for module, dw in deltas.items():
        component, path = module.split(".", 1)
        torch.testing.assert_close(getattr(ref, component).get_submodule(path).get_delta_weight("default"), dw)
    with torch.no_grad():
        out_ours, out_ref = ours.unet(x, t, ctx).sample, ref.unet(x, t, ctx).sample
        ids = ours.tokenizer(["a large sks emblem"], return_tensors="pt").input_ids
        text_ours, text_ref = ours.text_encoder(ids)[0], ref.text_encoder(ids)[0]
        text_base = tiny_pipe().text_encoder(ids)[0]
    torch.testing.assert_close(out_ours, out_ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(text_ours, text_ref, rtol=1e-4, atol=1e-5)
    assert (out_ours - base).abs().max() > 1e-3 and (text_ours - text_base).abs().max() > 1e-3


def test_kron_delta_adds_the_kronecker_product() -> None:
    g = torch.Generator().manual_seed(0)
    w1, w2, x = torch.randn(3, 4, generator=g), torch.randn(5, 6, generator=g), torch.randn(2, 7, 24, generator=g)
    layer = torch.nn.Linear(24, 15)
    base = layer(x)
    torch.nn.utils.parametrize.register_parametrization(layer, "weight", KronDelta(w1, w2))
    torch.testing.assert_close(layer(x), base + x @ torch.kron(w1, w2).T)
    conv, a = torch.nn.Conv2d(6, 4, 3, padding=1), torch.randn(2, 2, generator=g)
    b, y = torch.randn(2, 3, 3, 3, generator=g), torch.randn(1, 6, 8, 8, generator=g)
    base = conv(y)
    torch.nn.utils.parametrize.register_parametrization(conv, "weight", KronDelta(a, b))
    dw = torch.stack([torch.stack([a[i // 2, j // 3] * b[i % 2, j % 3] for j in range(6)]) for i in range(4)])
    torch.testing.assert_close(conv(y), base + torch.nn.functional.conv2d(y, dw, padding=1))  # A (x) B per tap


@pytest.mark.parametrize("shape", [(12, 20), (12, 20, 3, 3)])
def test_kron_add_gradients_equal_autograd_through_kron(shape: tuple) -> None:
    g = torch.Generator().manual_seed(1)
    weight, grad = torch.randn(*shape, generator=g, requires_grad=True), torch.randn(*shape, generator=g)
    w1 = torch.randn(3, 4, generator=g, requires_grad=True)
    w2 = torch.randn(4, 5, *shape[2:], generator=g, requires_grad=True)
    KronAdd.apply(weight, w1, w2).backward(grad)
    ours = weight.grad.clone(), w1.grad.clone(), w2.grad.clone()
    weight.grad = w1.grad = w2.grad = None
    (weight + kron(w1, w2)).backward(grad)  # autograd through torch.kron, the reference
    torch.testing.assert_close(ours, (weight.grad, w1.grad, w2.grad))
    assert ours[1].abs().max() > 0 and ours[2].abs().max() > 0


def image(pipe) -> torch.Tensor:  # noqa: ANN001
    for model in (pipe.unet, pipe.text_encoder, getattr(pipe, "text_encoder_2", None)):
        if model is not None:
            model.eval()
    config = GenerateConfig(prompt="a large sks emblem on the left on a gray background", steps=2, size="32x32")
    return torch.from_numpy(generate(config, pipe=pipe, output_type="np").images)


CASES = [
    ("sd1", "dreambooth_lora", {}),  # text-encoder LoRA too, the default
    ("sd1", "kronecker", {}),
    ("sd2", "dreambooth_lora", {"train_text_encoder": False}),
    ("sdxl", "dreambooth_lora", {"train_text_encoder": True}),
    ("sdxl", "kronecker", {"factor": 8}),
]


@pytest.mark.parametrize(("kind", "method", "options"), CASES, ids=[f"{k}-{m}" for k, m, _ in CASES])
def test_trained_adapter_round_trips_through_the_library(
    kind: str, method: str, options: dict, tiny_dirs: dict[str, Path]
) -> None:
    model = str(tiny_dirs[kind])
    method_config, config = configs_from_mapping(
        {
            "method": method,
            **options,
            "trigger": "sks",
            "name": f"emb-{kind}",
            "world_emblem": 3,
            "model": model,
            "train_steps": 3,
            "lr": 1e-2,
            "world_images": 3,
            "prior_preservation": False,
            "sample_steps": 1,
            "save_every": 0,
            "progress": False,
            "device": "cpu",  # explicit: the suite also runs where a GPU is visible
            "sample_prompts": ["a large sks emblem in the center on a white background"],
        }
    )
    result = train(method_config, config)
    assert result.status == "done"
    entry = Library().get(f"emb-{kind}")
    assert entry.meta.method == method and entry.meta.trigger_words == ["sks"] and entry.meta.kind == "subject"
    assert entry.meta.peft_type == ("LOKR" if method == "kronecker" else "LORA")
    assert [p.name for p in entry.samples] == ["seed0000.png"] and (entry.folder / "loss.png").is_file()
    assert "sks" in entry.card and "loss.png" in entry.card
    record = json.loads((entry.folder / "train_config.json").read_text())
    assert record["method"] == method and record["seed"] == 0 and record["method_config"]["lr"] == 1e-2
    components = {m.split(".", 1)[0] for m in entry.modules}
    assert components == (
        {"unet", "text_encoder"} | ({"text_encoder_2"} if kind == "sdxl" else set())
        if options.get("train_text_encoder", True)
        else {"unet"}
    )

    state, deltas = entry.state_dict(), result.method.delta_weights()
    assert all(dw.abs().max() > 0 for m, dw in deltas.items() if m.startswith("unet.")), "every UNet module trained"
    for module, dw in deltas.items():
        torch.testing.assert_close(delta_weight(entry.meta, state, module), dw.flatten(1))  # library: conv flattened

    trained = image(result.pipe)
    fresh = load_pipeline(model)
    base = image(fresh)
    with warnings.catch_warnings():
        warnings.simplefilter("error", CheckpointMismatchWarning)  # the recorded base is this checkpoint
        load_adapters(fresh, [f"emb-{kind}"])
    loaded = image(fresh)
    assert (loaded - base).abs().max() > 1e-5, "the adapter changes the output"
    torch.testing.assert_close(loaded, trained, rtol=1e-4, atol=1e-5)


def test_train_cancel_resume_and_guards(tiny_dirs: dict[str, Path]) -> None:
    config = quick(model=str(tiny_dirs["sd1"]), name="emb", train_steps=3, world_images=3, sample_prompts=[])
    calls = iter(range(100))
    done = []
    result = train("dreambooth_lora", config, cancel=lambda: next(calls) >= 2, callbacks=None)
    assert result.status == "cancelled" and result.step == 2 and result.entry is None and "emb" not in Library()
    with pytest.raises(StudioError, match="already holds a run.*--resume latest"):
        train("dreambooth_lora", config)
    with pytest.raises(StudioError, match="was started with batch_size=1"):
        train("dreambooth_lora", dataclasses.replace(config, resume="latest", batch_size=2))
    with pytest.raises(StudioError, match="was started with method='dreambooth_lora'"):
        train("kronecker", dataclasses.replace(config, resume="latest"))
    from trainers import Callbacks

    result = train(
        "dreambooth_lora", dataclasses.replace(config, resume="latest"), callbacks=Callbacks(on_done=done.append)
    )
    assert result.status == "done" and result.step == 3 and done == [result] and "emb" in Library()
    with pytest.raises(StudioError, match="already exists"):
        train("dreambooth_lora", dataclasses.replace(config, resume="latest"))
    with pytest.raises(StudioError, match="--rank does not apply to kronecker"):
        train("kronecker", dataclasses.replace(config, rank=8, name="other"))
    with pytest.raises(StudioError, match="has 2 image"):
        train(DreamBoothLoRAConfig(), dataclasses.replace(config, world_images=2, name="other"))


@pytest.mark.parametrize("method", [FrozenDown, SparseMasked])
def test_unregistered_methods_train_and_export_through_the_library(method: type, tiny_dirs: dict[str, Path]) -> None:
    model = str(tiny_dirs["sd1"])
    config = quick(model=model, name="toy", lr=1e-2, world_images=3, sample_prompts=[])
    result = train(method(), config)
    entry = Library().get("toy")
    assert result.status == "done" and entry.meta.method == method.config_cls.method
    fresh = load_pipeline(model)
    base = image(fresh)
    load_adapters(fresh, ["toy"])
    loaded = image(fresh)
    assert (loaded - base).abs().max() > 1e-5
    torch.testing.assert_close(loaded, image(result.pipe), rtol=1e-4, atol=1e-5)
