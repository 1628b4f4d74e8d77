"""`studio world render` and `studio world eval` through `studio.cli.main`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from studio.cli import main


PROMPT = "a large green heart on the right and a small blue star on the top left on a beige background"


def test_render_then_eval(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "scene.png"
    assert main(["world", "render", "--prompt", PROMPT, "--seed", "3", "--out", str(out)]) == 0
    assert out.is_file()
    capsys.readouterr()
    assert main(["world", "eval", "--image", str(out), "--prompt", PROMPT]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["all_correct"] and report["attribute_accuracy"] == 1.0
    assert main(["world", "eval", "--image", str(out), "--prompt", PROMPT.replace("green", "red")]) == 0
    assert not json.loads(capsys.readouterr().out)["all_correct"]


def test_emblem_and_texture_flags(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "e.png"
    assert (
        main(
            [
                "world",
                "render",
                "--prompt",
                "a large emblem on the left on a gray background",
                "--emblem",
                "5",
                "--seed",
                "0",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    capsys.readouterr()
    assert main(["world", "eval", "--image", str(out), "--prompt", "a large emblem on the left", "--emblem", "5"]) == 0
    assert json.loads(capsys.readouterr().out)["subject_fidelity"] == 1.0


def test_bad_input_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["world", "eval", "--image", str(tmp_path / "missing.png"), "--prompt", "a red star"]) == 2
    assert "no image" in capsys.readouterr().err
    bad = tmp_path / "bad.png"
    bad.write_text("not an image")
    assert main(["world", "eval", "--image", str(bad), "--prompt", "a red star"]) == 2
    assert main(["world", "render", "--prompt", "a teal blob", "--out", str(tmp_path / "x.png")]) == 2
    assert main(["world", "render", "--prompt", "a large emblem", "--out", str(tmp_path / "x.png")]) == 2
