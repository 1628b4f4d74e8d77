"""The Generate tab's handlers: the same images and PNGs as `studio generate`, and PNG parameters read back."""

from __future__ import annotations

from pathlib import Path

import gradio as gr
import numpy as np
import pytest
from PIL import Image, PngImagePlugin

from studio.errors import StudioError
from studio.generate import GenerateConfig, generate
from studio.pnginfo import read_parameters
from studio.ui.errors import shows_errors
from studio.ui.generate_tab import config_from_form, read_png, run_generate


def _form(model: Path, **changes: object) -> dict[str, object]:
    form = {"model": str(model), "prompt": "a red star", "negative": "", "seed": 4.0, "steps": 2, "guidance": "",
            "guidance_rescale": "", "scheduler": "ddim", "size": "", "num_images": 1}  # fmt: skip
    return {**form, **changes}


def test_generate_matches_the_api_and_writes_pngs_with_parameters(tiny_dirs: dict, tmp_path: Path) -> None:
    model = tiny_dirs["sd1"]
    images, text, files = run_generate(_form(model, num_images=2), out_dir=tmp_path)
    expected = generate(GenerateConfig(prompt="a red star", model=str(model), seed=4, steps=2, scheduler="ddim",
                                       num_images=2)).images  # fmt: skip
    for path, image in zip(images, expected):
        assert np.array_equal(np.asarray(Image.open(path).convert("RGB")), np.asarray(image))
    assert [Path(f).name for f in files] == ["image-000.png", "image-001.png", "image-grid.png"]
    assert "Seed: 4" in text and "Seed: 5" in text and "Sampler: DDIM" in text
    assert read_parameters(images[1])["seed"] == 5


def test_empty_optional_fields_mean_the_models_own() -> None:
    config = config_from_form(_form(Path("m"), scheduler="", guidance="", size=""))
    assert config.scheduler is None and config.guidance is None and config.size is None and config.seed == 4
    assert config_from_form(_form(Path("m"), guidance="5.5", size="64x64")).guidance == 5.5
    with pytest.raises(StudioError, match="guidance must be a number"):
        config_from_form(_form(Path("m"), guidance="strong"))


def test_a_studio_png_fills_the_form_again(tiny_dirs: dict, tmp_path: Path) -> None:
    form = _form(tiny_dirs["sd1"], negative="blurry", size="32x32", guidance_rescale="0.5")
    images, _, _ = run_generate(form, out_dir=tmp_path)
    text, fields = read_png(images[0])
    assert fields == {"prompt": "a red star", "model": str(tiny_dirs["sd1"]), "negative": "blurry", "seed": 4,
                      "steps": 2, "guidance": 7.5, "guidance_rescale": 0.5, "size": "32x32",
                      "scheduler": "ddim"}  # fmt: skip
    assert text.startswith("a red star\nNegative prompt: blurry\nSteps: 2, Sampler: DDIM, CFG scale: 7.5, Seed: 4")


def test_an_a1111_png_is_mapped_onto_our_fields(tmp_path: Path) -> None:
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", "a cat\nNegative prompt: dog\nSteps: 30, Sampler: DPM++ 2M Karras, CFG scale: 6, "
                                "Seed: 12, Size: 512x768, Model: v1-5")  # fmt: skip
    path = tmp_path / "a1111.png"
    Image.new("RGB", (8, 8)).save(path, pnginfo=info)
    _, fields = read_png(str(path))
    assert fields == {"prompt": "a cat", "negative": "dog", "steps": 30, "guidance": 6.0, "seed": 12,
                      "size": "512x768", "model": "v1-5", "scheduler": "dpmpp_2m_karras"}  # fmt: skip


def test_a_png_without_parameters_or_a_non_image_is_an_error_in_the_page(tmp_path: Path) -> None:
    plain, text = tmp_path / "plain.png", tmp_path / "notes.png"
    Image.new("RGB", (8, 8)).save(plain)
    text.write_text("hello")
    with pytest.raises(gr.Error, match="carries no generation parameters"):
        shows_errors(read_png)(str(plain))
    with pytest.raises(gr.Error, match="is not a readable image"):
        shows_errors(read_png)(str(text))
    assert read_png(None) == ("", {})


def test_a_missing_model_is_an_error_in_the_page(tmp_path: Path) -> None:
    with pytest.raises(gr.Error, match="does not exist"):
        shows_errors(run_generate)(_form(tmp_path / "missing"))


def test_history_restores_an_image_and_sends_it_on(tiny_dirs: dict, tmp_path: Path) -> None:
    from studio.ui.display import display_copy, display_image
    from studio.ui.generate_tab import (
        HISTORY_LIMIT,
        add_to_history,
        gallery_items,
        image_records,
        random_seed,
        restore_fields,
    )
    from studio.ui.send import compose_fields, training_uploads

    form = _form(tiny_dirs["sd1"], num_images=2, negative="blurry")
    images, _, _ = run_generate(form, out_dir=tmp_path)
    records = image_records(images)
    items = gallery_items(records)
    assert [caption for _, caption in items] == ["seed 4", "seed 5"]  # each image's seed under it
    shown, original = Image.open(items[1][0]), Image.open(images[1])
    assert shown.size == (256, 256) and original.size == (32, 32)  # enlarged 8x; the original kept as it was
    assert np.array_equal(np.asarray(shown.convert("RGB")), np.asarray(display_image(original.convert("RGB"))))
    assert display_copy(images[1]) == items[1][0]  # made once per file

    history = add_to_history(add_to_history([], records[:1]), records[1:])
    assert [r["params"]["seed"] for r in history] == [5, 4]  # newest first
    assert len(add_to_history(history * HISTORY_LIMIT, records)) == HISTORY_LIMIT
    fields = restore_fields(history[0]["params"])
    assert fields["seed"] == 5 and fields["num_images"] == 1 and fields["negative"] == "blurry"
    again, _, _ = run_generate({**form, **fields}, out_dir=tmp_path / "again")  # the same image, made again
    assert np.array_equal(np.asarray(Image.open(again[0])), np.asarray(original))

    assert compose_fields(records[1]["params"]) == {"prompt": "a red star", "model": str(tiny_dirs["sd1"]),
                                                    "seed": 5, "steps": 2}  # fmt: skip
    uploads = training_uploads(images[1], records[1]["params"], None)
    assert Path(uploads[0]).name.startswith("generated-seed5-")
    assert Path(uploads[0]).read_bytes() == Path(images[1]).read_bytes()
    assert training_uploads(images[1], records[1]["params"], uploads) == uploads  # not added twice
    both = training_uploads(images[0], records[0]["params"], uploads)
    assert len(both) == 2 and len({Path(u).name for u in both}) == 2  # names never clash in one dataset
    assert 0 <= random_seed() < 2**32 and len({random_seed() for _ in range(5)}) > 1
    big = Image.new("RGB", (512, 300))
    assert display_image(big) is big and display_image(Image.new("RGB", (64, 48))).size == (256, 192)


def test_form_numbers_refuse_nan_and_infinity_naming_the_field() -> None:
    for value in ("nan", "inf", float("nan")):
        with pytest.raises(StudioError, match="guidance must be a finite number"):
            config_from_form(_form(Path("m"), guidance=value))
    with pytest.raises(StudioError, match="seed must be a finite number"):
        config_from_form(_form(Path("m"), seed=float("inf")))
