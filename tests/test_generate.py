"""`studio generate` on tiny SD1, SD2 and SDXL folders: PNGs, parameters, determinism across processes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from studio.cli import main
from studio.errors import StudioError
from studio.generate import GenerateConfig, generate
from studio.pnginfo import parse_a1111, read_parameters
from studio.schedulers import SCHEDULERS


def _pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


KINDS = ("sd1", "sd2", "sdxl")
SINGLE_FILE_ARGS = ["generate", "--prompt", "a small green triangle", "--seed", "3", "--steps", "3"]


def _identity_args(model: Path) -> list[str]:
    return ["generate", "--model", str(model), "--prompt", "a large red star on the left", "--negative", "blurry",
            "--seed", "7", "--steps", "3"]


@pytest.fixture(scope="module")
def other_process(
    tiny_dirs: dict, tiny_single_file: Path, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Path]:
    """Each kind's image, and the single-file checkpoint's, made by `studio generate` in one other process (a
    process's start, torch and diffusers imported, is about 10 s of the suite)."""
    import json

    import torch

    out = tmp_path_factory.mktemp("other-process")
    calls = [[*_identity_args(tiny_dirs[kind]), "--out", str(out / f"{kind}.png")] for kind in KINDS]
    calls.append([*SINGLE_FILE_ARGS, "--model", str(tiny_single_file), "--out", str(out / "single-file.png")])
    code = "import json, sys; from studio.cli import main; sys.exit(max(main(a) for a in json.loads(sys.argv[1])))"
    # this process's torch thread count: a float sum split over another number of threads rounds differently, and
    # other test modules set one thread at import
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(torch.get_num_threads())}
    done = subprocess.run([sys.executable, "-c", code, json.dumps(calls)], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
    return {kind: out / f"{kind}.png" for kind in (*KINDS, "single-file")}


@pytest.mark.parametrize("kind", KINDS)
def test_generate_is_identical_across_processes(kind: str, tiny_dirs: dict, other_process: dict, tmp_path: Path,
                                                capsys) -> None:
    args = _identity_args(tiny_dirs[kind])
    assert main([*args, "--out", str(tmp_path / "a.png")]) == 0
    a, b = _pixels(tmp_path / "a.png"), _pixels(other_process[kind])
    assert a.shape == (32, 32, 3) and a.std() > 0
    assert np.array_equal(a, b)

    params = read_parameters(tmp_path / "a.png")
    assert params["prompt"] == "a large red star on the left" and params["negative"] == "blurry"
    assert (params["seed"], params["steps"], params["guidance"], params["size"]) == (7, 3, 7.5, "32x32")
    assert params["model"] == str(tiny_dirs[kind]) and params["adapters"] == []

    capsys.readouterr()
    assert main(["info", str(tmp_path / "a.png")]) == 0
    text = capsys.readouterr().out
    parsed = parse_a1111(text)
    assert parsed["prompt"] == "a large red star on the left" and parsed["Seed"] == "7" and parsed["Steps"] == "3"


def test_original_layout_single_file_generates_like_its_folder(tiny_dirs: dict, tiny_single_file: Path,
                                                               other_process: dict, tmp_path: Path, capsys) -> None:
    args = SINGLE_FILE_ARGS
    assert main([*args, "--model", str(tiny_single_file), "--out", str(tmp_path / "file.png")]) == 0
    assert main([*args, "--model", str(tiny_dirs["sd1"]), "--out", str(tmp_path / "folder.png")]) == 0
    single = _pixels(tmp_path / "file.png")
    assert single.std() > 0
    assert np.array_equal(single, _pixels(other_process["single-file"]))  # loaded in another process
    assert np.array_equal(single, _pixels(tmp_path / "folder.png"))
    assert read_parameters(tmp_path / "file.png")["model"] == str(tiny_single_file)
    capsys.readouterr()
    assert main(["info", str(tmp_path / "file.png")]) == 0
    assert parse_a1111(capsys.readouterr().out)["Seed"] == "3"


def test_num_images_writes_each_and_a_grid(tiny_dirs: dict, tmp_path: Path) -> None:
    out = tmp_path / "many.png"
    code = main(["generate", "--model", str(tiny_dirs["sd1"]), "--prompt", "a blue ring", "--seed", "1",
                 "--steps", "2", "--num-images", "3", "--out", str(out)])
    assert code == 0
    images = [_pixels(tmp_path / f"many-{i:03d}.png") for i in range(3)]
    grid = _pixels(tmp_path / "many-grid.png")
    assert grid.shape == (64, 64, 3)  # 2x2 cells of 32 px
    assert np.array_equal(grid[:32, 32:], images[1])
    assert [read_parameters(tmp_path / f"many-{i:03d}.png")["seed"] for i in range(3)] == [1, 2, 3]
    # image i is reproducible alone with seed + i
    alone = generate(GenerateConfig(prompt="a blue ring", model=str(tiny_dirs["sd1"]), seed=3, steps=2))
    assert np.abs(np.asarray(alone.images[0], dtype=int) - images[2].astype(int)).max() <= 1


@pytest.mark.parametrize("kind", ["sd1", "sdxl"])
def test_a_prompt_per_image_in_one_batch_matches_each_alone(kind: str, tiny_dirs: dict) -> None:
    model, texts = str(tiny_dirs[kind]), ["a blue ring", "a red star on the left", "a green square"]
    batch = generate(GenerateConfig(prompt=texts[0], model=model, seed=4, steps=2, num_images=3), prompts=texts)
    assert [p["prompt"] for p in batch.params] == texts and [p["seed"] for p in batch.params] == [4, 5, 6]
    for i, text in enumerate(texts):
        alone = generate(GenerateConfig(prompt=text, model=model, seed=4 + i, steps=2)).images[0]
        assert np.abs(np.asarray(alone, dtype=int) - np.asarray(batch.images[i], dtype=int)).max() <= 1
    assert not np.array_equal(np.asarray(batch.images[0]), np.asarray(batch.images[1]))
    with pytest.raises(StudioError, match="2 prompts for 3 images"):
        generate(GenerateConfig(prompt="x", model=model, num_images=3), prompts=texts[:2])
    seeded = generate(GenerateConfig(prompt="x", model=model, steps=2, num_images=3), prompts=texts, seeds=[6, 5, 4])
    assert [p["seed"] for p in seeded.params] == [6, 5, 4]  # each image its own seed, in one batch
    alone = generate(GenerateConfig(prompt=texts[2], model=model, seed=4, steps=2)).images[0]
    assert np.abs(np.asarray(alone, dtype=int) - np.asarray(seeded.images[2], dtype=int)).max() <= 1
    with pytest.raises(StudioError, match="1 seeds for 3 images"):
        generate(GenerateConfig(prompt="x", model=model, num_images=3), seeds=[1])


@pytest.mark.parametrize("name", list(SCHEDULERS))
def test_every_scheduler_runs_and_keeps_prediction_type(name: str, tiny_dirs: dict) -> None:
    config = GenerateConfig(prompt="a white cross", model=str(tiny_dirs["sd2"]), steps=3, scheduler=name)
    result = generate(config)
    assert result.params[0]["scheduler"] == name
    from studio.generate import cached_pipeline

    pipe = cached_pipeline(str(tiny_dirs["sd2"]), "cpu")
    assert pipe.scheduler.config.prediction_type == "v_prediction"


def test_default_scheduler_is_restored_after_override(tiny_dirs: dict) -> None:
    model = str(tiny_dirs["sd1"])
    first = generate(GenerateConfig(prompt="a star", model=model, steps=2)).images[0]
    generate(GenerateConfig(prompt="a star", model=model, steps=2, scheduler="euler_a"))
    again = generate(GenerateConfig(prompt="a star", model=model, steps=2)).images[0]
    assert np.array_equal(np.asarray(first), np.asarray(again))


def test_bad_flags_are_clear(tiny_dirs: dict, tmp_path: Path, capsys) -> None:
    base = ["generate", "--model", str(tiny_dirs["sd1"]), "--prompt", "x"]
    assert main([*base, "--size", "65x64", "--out", str(tmp_path / "x.png")]) == 2
    assert "multiples of 8" in capsys.readouterr().err
    assert main([*base, "--out", str(tmp_path / "x.jpg")]) == 2
    assert ".png" in capsys.readouterr().err


def test_guidance_rescale_is_passed_and_read_from_the_model_folder(tiny_dirs: dict, tmp_path: Path) -> None:
    import json
    import shutil

    from studio.errors import StudioError

    folder = tmp_path / "model"
    shutil.copytree(tiny_dirs["sd1"], folder)

    def run(model: Path, rescale: float | None) -> tuple[np.ndarray, dict]:
        config = GenerateConfig(prompt="a large red star", model=str(model), seed=2, steps=3, guidance_rescale=rescale)
        result = generate(config, output_type="np")
        return result.images[0], result.params[0]

    plain, params = run(folder, None)
    assert params["guidance_rescale"] == 0.0
    rescaled, params = run(folder, 0.7)
    assert params["guidance_rescale"] == 0.7 and np.abs(rescaled - plain).max() > 1e-4
    (folder / "studio.json").write_text(json.dumps({"guidance_rescale": 0.7}))
    recommended, params = run(folder, None)
    assert params["guidance_rescale"] == 0.7 and np.array_equal(recommended, rescaled)
    (folder / "studio.json").write_text(json.dumps({"guidance_rescale": "strong"}))
    with pytest.raises(StudioError, match="guidance_rescale must be a number"):
        run(folder, None)
    with pytest.raises(StudioError, match="between 0 and 1"):
        GenerateConfig(prompt="x", guidance_rescale=1.5)
