"""`<lora:name:w>` tags in a prompt load library adapters for that generation only, and are recorded in the PNG."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from library_helpers import make_kohya

from studio.cli import main
from studio.errors import StudioError
from studio.generate import GenerateConfig, cached_pipeline, generate
from studio.library.load import load_adapters, loaded_adapters, unload_adapters
from studio.pnginfo import read_parameters


def _image(model: Path, prompt: str) -> np.ndarray:
    config = GenerateConfig(prompt=prompt, model=str(model), seed=4, steps=3)
    return np.asarray(generate(config, output_type="np").images[0])


def test_tags_apply_adapters_for_one_generation(tiny_dirs: dict, tmp_path: Path) -> None:
    model = tiny_dirs["sd1"]
    pipe = cached_pipeline(str(model), "cpu")
    make_kohya(pipe, tmp_path / "star.safetensors", "sd1", seed=3, with_alpha=False)
    assert main(["library", "import", str(tmp_path / "star.safetensors"), "--name", "star"]) == 0

    base = _image(model, "a red star")
    tagged = _image(model, "a red star <lora:star:1>")
    assert np.abs(tagged - base).max() > 1e-3  # the adapter changes the image
    assert np.array_equal(_image(model, "a red star"), base)  # and is gone afterwards: the base is restored exactly
    assert not loaded_adapters(pipe)
    half = _image(model, "<lora:star:0.5> a red star")
    assert 0 < np.abs(half - base).max() < np.abs(tagged - base).max()

    out = tmp_path / "tagged.png"
    assert main(["generate", "--model", str(model), "--prompt", "a red star <lora:star:0.8>", "--seed", "4",
                 "--steps", "3", "--out", str(out)]) == 0
    params = read_parameters(out)
    assert params["adapters"] == [{"name": "star", "weight": 0.8}] and params["prompt"] == "a red star <lora:star:0.8>"


def test_tags_keep_adapters_the_caller_loaded(tiny_dirs: dict, tmp_path: Path) -> None:
    model = tiny_dirs["sd1"]
    pipe = cached_pipeline(str(model), "cpu")
    make_kohya(pipe, tmp_path / "a.safetensors", "sd1", seed=5, with_alpha=False)
    assert main(["library", "import", str(tmp_path / "a.safetensors"), "--name", "mine"]) == 0
    main(["library", "import", str(tmp_path / "a.safetensors"), "--name", "other"])
    load_adapters(pipe, ["mine"], [0.7])
    try:
        before = _image(model, "a blue ring")
        _image(model, "a blue ring <lora:other:1> <lora:mine:0.2>")
        assert loaded_adapters(pipe) == {"mine": 0.7}
        assert np.array_equal(_image(model, "a blue ring"), before)
    finally:
        unload_adapters(pipe)


def test_unknown_tag_is_a_clear_error(tiny_dirs: dict) -> None:
    with pytest.raises(StudioError, match="nosuch"):
        _image(tiny_dirs["sd1"], "a red star <lora:nosuch:1>")
    assert not loaded_adapters(cached_pipeline(str(tiny_dirs["sd1"]), "cpu"))
