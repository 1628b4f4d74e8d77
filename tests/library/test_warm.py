"""Adapters kept warm after a tagged or composed call: taken up again without injection while their files are
unchanged, out of the model meanwhile (the base modules back in place), bounded in number, and out of the way of
other adapter types and of a model moved to another dtype."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from composer_helpers import add_random_adapter
from library_helpers import make_kohya, make_lycoris
from peft.tuners.lokr.layer import LoKrLayer
from peft.tuners.tuners_utils import BaseTunerLayer
from tiny_models import BUILDERS

import studio.library.load as load
from studio.generate import GenerateConfig, generate
from studio.library import Library, import_adapter
from studio.library.formats.sd_scripts import known_stems


@pytest.fixture
def pipe(tiny_dirs: dict):  # noqa: ANN201
    from studio.generate import cached_pipeline

    pipe = cached_pipeline(str(tiny_dirs["sd1"]), "cpu")
    load.unload_adapters(pipe)
    yield pipe
    load.unload_adapters(pipe)


def _image(pipe, prompt: str) -> np.ndarray:  # noqa: ANN001
    config = GenerateConfig(prompt=prompt, model=pipe.name_or_path, seed=3, steps=2)
    return generate(config, pipe=pipe, output_type="np").images[0]


def _count_injections(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    injected: list[str] = []
    inject = load.inject
    monkeypatch.setattr(load, "inject", lambda pipe, name, *a: (injected.append(name), inject(pipe, name, *a))[1])
    return injected


def _layers(pipe) -> list[BaseTunerLayer]:  # noqa: ANN001
    return [m for m in pipe.unet.modules() if isinstance(m, BaseTunerLayer)]


def test_a_tag_is_injected_once_and_computes_as_if_loaded_afresh(pipe, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: ANN001
    add_random_adapter(pipe, "warm-a", seed=1, scale=0.4)
    injected = _count_injections(monkeypatch)
    plain = _image(pipe, "a red star")
    first = _image(pipe, "a red star <lora:warm-a:0.8>")
    assert injected == ["warm-a"]
    assert load.loaded_adapters(pipe) == {} and not _layers(pipe)  # set aside: the base modules run plain images
    assert np.array_equal(_image(pipe, "a red star"), plain)
    second = _image(pipe, "a red star <lora:warm-a:0.8>")
    assert injected == ["warm-a"]  # taken up again, not injected
    assert np.array_equal(second, first) and np.abs(first - plain).max() > 1e-3
    load.unload_adapters(pipe)  # also the warm ones
    assert not load._WARM[pipe].adapters
    assert np.array_equal(_image(pipe, "a red star <lora:warm-a:0.8>"), first)
    assert injected == ["warm-a", "warm-a"]


def test_a_rewritten_adapter_is_loaded_afresh(pipe, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: ANN001
    add_random_adapter(pipe, "warm-b", seed=2, scale=0.4)
    before = _image(pipe, "a red star <lora:warm-b>")
    entry = Library().get("warm-b")
    tensors = {k: v * 2 for k, v in entry.state_dict().items()}
    Library().add("warm-b", tensors, entry.meta, overwrite=True)  # retrained under the same name
    injected = _count_injections(monkeypatch)
    after = _image(pipe, "a red star <lora:warm-b>")
    assert injected == ["warm-b"]
    assert np.abs(after - before).max() > 1e-3
    load.unload_adapters(pipe)
    assert np.array_equal(_image(pipe, "a red star <lora:warm-b>"), after)


def test_at_most_warm_adapters_stay_and_the_oldest_goes_first(pipe, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: ANN001
    monkeypatch.setattr(load, "WARM", 2)
    names = [f"warm-{i}" for i in range(3)]
    for i, name in enumerate(names):
        add_random_adapter(pipe, name, seed=10 + i)
        load.load_adapters(pipe, [name])
        load.release_adapters(pipe, [name])
    assert list(load._WARM[pipe].adapters) == ["warm-1", "warm-2"]
    injected = _count_injections(monkeypatch)
    load.load_adapters(pipe, ["warm-1", "warm-0"], [0.5, 0.5])
    assert injected == ["warm-0"] and load.loaded_adapters(pipe) == {"warm-1": 0.5, "warm-0": 0.5}
    held = {n for m in _layers(pipe) for n in m.lora_A}
    assert held == {"warm-0", "warm-1", "warm-2"}  # warm-2 back in place too, inactive
    assert all(set(m.active_adapters) <= {"warm-0", "warm-1"} for m in _layers(pipe))


def test_a_model_moved_to_another_dtype_loads_its_adapters_afresh(pipe, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: ANN001
    add_random_adapter(pipe, "warm-c", seed=4)
    load.load_adapters(pipe, ["warm-c"])
    load.release_adapters(pipe, ["warm-c"])
    injected = _count_injections(monkeypatch)
    pipe.unet.to(torch.float64)
    try:
        load.load_adapters(pipe, ["warm-c"])
        assert injected == ["warm-c"]
        assert all(p.dtype == torch.float64 for m in _layers(pipe) for p in m.lora_A.parameters())
    finally:
        load.unload_adapters(pipe)
        pipe.unet.to(torch.float32)


def test_kohya_import_and_another_adapter_type_see_past_warm_adapters(tmp_path) -> None:  # noqa: ANN001
    pipe = BUILDERS["sd1"]()
    stems = known_stems(pipe, ldm=False, layers_per_block=pipe.unet.config.layers_per_block, sdxl_te=False)
    make_kohya(pipe, tmp_path / "k.safetensors", "sd1", seed=8)
    import_adapter(tmp_path / "k.safetensors", name="lora", pipe=pipe)
    load.load_adapters(pipe, ["lora"])  # loaded by the caller: its PEFT layers stay in the model
    assert _layers(pipe)
    again = known_stems(pipe, ldm=False, layers_per_block=pipe.unet.config.layers_per_block, sdxl_te=False)
    assert again == stems  # the PEFT layers' base layers, under the modules' own names
    load.release_adapters(pipe, ["lora"])
    make_lycoris(pipe, tmp_path / "lokr.safetensors")
    import_adapter(tmp_path / "lokr.safetensors", name="kron", pipe=pipe)
    x = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    ctx = torch.randn(1, 77, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        base = pipe.unet(x, 10, ctx).sample
        load.load_adapters(pipe, ["kron"])  # the warm LoRA on the same layers goes, rather than refusing the LoKr
        assert isinstance(pipe.unet.get_submodule("down_blocks.1.resnets.0.conv1"), LoKrLayer)
        assert (pipe.unet(x, 10, ctx).sample - base).abs().max() > 1e-4
        load.unload_adapters(pipe)
        assert torch.equal(pipe.unet(x, 10, ctx).sample, base)


def test_a_warm_adapter_deleted_from_the_library_is_a_clear_error(pipe) -> None:  # noqa: ANN001
    from studio.errors import StudioError

    add_random_adapter(pipe, "warm-d", seed=5)
    _image(pipe, "a red star <lora:warm-d>")
    Library().remove("warm-d")
    with pytest.raises(StudioError, match="no adapter named 'warm-d'"):
        _image(pipe, "a red star <lora:warm-d>")
    assert load.loaded_adapters(pipe) == {} and not load._WARM[pipe].adapters and not _layers(pipe)
