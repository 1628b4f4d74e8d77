"""Different adapters per image in one batch (`studio.mixed`): each image as its own generation would make it, and the
pipeline as it was afterwards."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from composer_helpers import add_random_adapter

from studio.generate import GenerateConfig, cached_pipeline, generate
from studio.library import AdapterMeta, Library
from studio.library.load import load_adapters, loaded_adapters, unload_adapters
from studio.mixed import MixedUnsupported, mixed_adapters, why_not_mixed


PROMPTS = ["a large red star on the left", "a small blue ring", "a large green square", "a red ring on the right"]
SETS = [{"mix-a": 0.8}, {"mix-b": 1.0}, {"mix-a": 1.0, "mix-b": -0.5}, {}]  # one image without adapters


@pytest.fixture(autouse=True)
def _one_thread(one_thread: None) -> None:
    pass


def _add_conv_adapter(pipe, name: str, seed: int) -> None:  # noqa: ANN001
    """A random LoRA on the ResNet 3x3 convolutions and the feed-forward (hooked layers, not attention)."""
    g = torch.Generator().manual_seed(seed)
    state_dict, ranks, alphas = {}, {}, {}
    for path, module in pipe.unet.named_modules():
        if path.endswith(("conv1", "ff.net.2")) and isinstance(module, torch.nn.Conv2d | torch.nn.Linear):
            key = f"unet.{path}"
            if isinstance(module, torch.nn.Conv2d):
                a = torch.randn(2, module.in_channels, 3, 3, generator=g) * 0.2
                b = torch.randn(module.out_channels, 2, 1, 1, generator=g) * 0.2
            else:
                a = torch.randn(2, module.in_features, generator=g) * 0.3
                b = torch.randn(module.out_features, 2, generator=g) * 0.3
            state_dict[f"{key}.lora_A.weight"], state_dict[f"{key}.lora_B.weight"] = a, b
            ranks[key], alphas[key] = 2, 2.0
    Library().add(name, state_dict, AdapterMeta(kind="subject", ranks=ranks, alphas=alphas, trigger_words=[name]))


def _images(result) -> np.ndarray:  # noqa: ANN001
    return np.stack([np.asarray(i, dtype=np.float32) for i in result.images])


@pytest.mark.parametrize("kind", ["sd1", "sdxl"])
def test_each_image_as_its_own_generation_would_make_it(kind: str, tiny_dirs: dict) -> None:
    model = str(tiny_dirs[kind])
    pipe = cached_pipeline(model, "cpu")
    add_random_adapter(pipe, "mix-a", seed=1, scale=0.4)
    _add_conv_adapter(pipe, "mix-b", seed=2)
    config = GenerateConfig(prompt=PROMPTS[0], model=model, seed=5, steps=3, num_images=4)
    grouped = generate(config, pipe=pipe, prompts=PROMPTS, seeds=[5, 6, 7, 8], adapter_sets=SETS, output_type="np")
    assert loaded_adapters(pipe) == {}  # the batch's adapters are gone again
    assert all(type(p).__name__ == "AttnProcessor2_0" for p in pipe.unet.attn_processors.values())
    assert not any(m._forward_hooks for m in pipe.unet.modules())
    alone, plain = [], []
    for i, (prompt, chosen) in enumerate(zip(PROMPTS, SETS)):
        tags = "".join(f" <lora:{n}:{w}>" for n, w in chosen.items())
        one = GenerateConfig(prompt=prompt + tags, model=model, seed=5 + i, steps=3)
        alone.append(generate(one, pipe=pipe, output_type="np").images[0])
        plain.append(generate(GenerateConfig(prompt=prompt, model=model, seed=5 + i, steps=3), pipe=pipe,
                              output_type="np").images[0])
    got, want, base = grouped.images, np.stack(alone), np.stack(plain)
    np.testing.assert_allclose(got, want, atol=2e-4)
    for i in range(3):  # the adapters matter, each image by its own ones
        assert np.abs(want[i] - base[i]).max() > 0.02, i
    np.testing.assert_allclose(got[3], base[3], atol=2e-4)
    assert [r["adapters"] for r in grouped.params] == [[{"name": n, "weight": w} for n, w in s.items()] for s in SETS]


def test_adapters_loaded_before_stay_active_in_every_image(tiny_dirs: dict) -> None:
    model = str(tiny_dirs["sd1"])
    pipe = cached_pipeline(model, "cpu")
    add_random_adapter(pipe, "mix-a", seed=1, scale=0.4)
    add_random_adapter(pipe, "mix-c", seed=3, scale=0.4)
    load_adapters(pipe, ["mix-c"], [0.7])
    try:
        config = GenerateConfig(prompt=PROMPTS[0], model=model, seed=5, steps=2, num_images=2)
        grouped = generate(config, pipe=pipe, prompts=PROMPTS[:2], seeds=[5, 6], adapter_sets=[{"mix-a": 1.0}, {}],
                           output_type="np")
        assert loaded_adapters(pipe) == {"mix-c": 0.7}
        first = generate(GenerateConfig(prompt=PROMPTS[0] + " <lora:mix-a:1.0>", model=model, seed=5, steps=2),
                         pipe=pipe, output_type="np").images[0]
        second = generate(GenerateConfig(prompt=PROMPTS[1], model=model, seed=6, steps=2), pipe=pipe,
                          output_type="np").images[0]
        np.testing.assert_allclose(grouped.images, np.stack([first, second]), atol=2e-4)
        assert grouped.params[1]["adapters"] == [{"name": "mix-c", "weight": 0.7}]
    finally:
        unload_adapters(pipe)


def test_adapters_that_are_not_plain_lora_do_not_mix() -> None:
    from peft import LoKrConfig, LoraConfig, inject_adapter_in_model
    from tiny_models import BUILDERS

    pipe = BUILDERS["sd1"]()  # its own pipeline: the LoKr stays on it
    inject_adapter_in_model(LoraConfig(r=2, target_modules=["to_q", "conv1"]), pipe.unet, adapter_name="lora")
    assert why_not_mixed(pipe, ["lora"]) is None
    inject_adapter_in_model(LoKrConfig(r=2, target_modules=["to_k"]), pipe.unet, adapter_name="kron")
    assert "is not a plain LoRA" in why_not_mixed(pipe, ["lora", "kron"])
    with pytest.raises(MixedUnsupported, match="--group 1"), mixed_adapters(pipe, PROMPTS[:1], [{"kron": 1.0}], None,
                                                                           True, None):
        pass


def test_adapter_sets_need_one_set_per_image_and_no_tags(tiny_dirs: dict) -> None:
    from studio.errors import StudioError

    pipe = cached_pipeline(str(tiny_dirs["sd1"]), "cpu")
    config = GenerateConfig(prompt="a star <lora:x:1>", seed=5, steps=2, num_images=1)
    with pytest.raises(StudioError, match="one adapter set per image"):
        generate(config, pipe=pipe, prompts=["a star"], adapter_sets=[{}])


def test_a_batch_that_does_not_fit_is_refused_as_out_of_memory(tiny_dirs: dict) -> None:
    """`studio batch` then runs the jobs one at a time (it catches `OutOfMemory`)."""
    from studio.errors import OutOfMemory

    pipe = cached_pipeline(str(tiny_dirs["sd1"]), "cpu")
    config = GenerateConfig(prompt="a star", seed=5, steps=2, num_images=2)
    with pytest.raises(OutOfMemory, match="lower --size or --num-images"):
        generate(config, pipe=pipe, prompts=["a star", "a ring"], adapter_sets=[{}, {}], free_memory=1)
