"""The Batch tab's handler: a JSONL job file in, the PNGs (with job and rank recorded) and one zip out."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import gradio as gr
import pytest

from studio.pnginfo import read_parameters
from studio.ui.batch_tab import batch_caption, run_batch_file
from studio.ui.errors import shows_errors


def test_a_job_file_gives_its_images_and_a_zip(tiny_dirs: dict, tmp_path: Path) -> None:
    model = str(tiny_dirs["sd1"])
    jobs = tmp_path / "jobs.jsonl"
    lines = [{"prompt": "a red star", "model": model, "steps": 1, "seed": 1},
             {"prompt": "a blue ring", "model": model, "steps": 1, "num_images": 2, "out": "ring.png"}]  # fmt: skip
    jobs.write_text("\n".join(json.dumps(line) for line in lines))
    seen: list[tuple[int, int]] = []
    files, summary, archive = run_batch_file(str(jobs), progress=lambda d, t: seen.append((d, t)), out_dir=tmp_path)
    names = sorted(Path(f).name for f in files)
    assert names == ["00000.png", "ring-000.png", "ring-001.png", "ring-grid.png"]
    assert summary == "2 of 2 jobs made 4 PNG files" and seen[-1] == (3, 3)  # images, not grids
    assert sorted(zipfile.ZipFile(archive).namelist()) == names
    assert read_parameters(tmp_path / "images" / "00000.png")["job"] == 0
    captions = {Path(f).name: batch_caption(f) for f in files}  # what the page shows under each image
    assert captions["00000.png"] == "00000.png · job 0 · seed 1 · a red star"
    assert captions["ring-001.png"] == "ring-001.png · job 1 · seed 1 · a blue ring"  # image i: seed + i
    assert captions["ring-grid.png"].startswith("ring-grid.png")


def test_a_bad_job_file_is_an_error_in_the_page(tmp_path: Path) -> None:
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text('{"prompt": "ok"}\nnot json\n')
    with pytest.raises(gr.Error, match="jobs.jsonl:2: not JSON"):
        shows_errors(run_batch_file)(str(jobs))
    with pytest.raises(gr.Error, match="upload a JSONL job file"):
        run_batch_file(None)
