"""The Batch tab: `studio batch` on an uploaded JSONL job file, with progress; the images come back as one zip, and
in the page each under its file name, job, seed and prompt."""

from __future__ import annotations

import shutil
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import gradio as gr

from studio.batch import read_jobs, run_batch
from studio.errors import StudioError
from studio.pnginfo import read_parameters
from studio.ui.cancel import cancellable
from studio.ui.display import PIXELATED, display_copy
from studio.ui.errors import shows_errors


def run_batch_file(
    path: str | None,
    progress: Callable[[int, int], None] | None = None,
    out_dir: Path | None = None,
    cancel: threading.Event | None = None,
) -> tuple[list[str], str, str]:
    """Run every job of a JSONL file; returns (image paths, summary, zip of the output folder)."""
    if not path:
        raise gr.Error('upload a JSONL job file: one JSON object per line, e.g. {"prompt": "a red star"}')
    jobs = read_jobs(path)
    out_dir = Path(out_dir or tempfile.mkdtemp(prefix="studio-batch-"))
    images = out_dir / "images"
    total = sum(int(job.options.get("num_images", 1)) for job in jobs)  # images reported by on_image (not grids)
    made: list[str] = []

    def on_image(file: Path) -> None:
        made.append(str(file))
        if progress is not None:
            progress(len(made), total)

    counts = run_batch(jobs, images, on_image=on_image, progress=False, cancel=cancel)
    archive = shutil.make_archive(str(out_dir / "batch"), "zip", root_dir=images)
    files = sorted(str(p) for p in images.rglob("*.png"))
    return files, f"{counts['made']} of {counts['jobs']} jobs made {len(files)} PNG files", archive


def batch_caption(path: str | Path) -> str:
    """`00003.png · job 3 · seed 7 · a red star`: which job made the image, read back from its PNG (a PNG without
    parameters by its name alone)."""
    name = Path(path).name
    try:
        params = read_parameters(path)
    except StudioError:
        return name
    parts = [name, f"job {params['job']}" if "job" in params else "", f"seed {params['seed']}" if "seed" in params
             else "", str(params.get("prompt") or "")]
    return " · ".join(p for p in parts if p)


def build_batch_tab() -> None:
    gr.Markdown(
        "One job per line, keys are the long flags of `studio generate` without dashes, e.g. "
        '`{"prompt": "a large red star on the left on a white background", "seed": 3, "steps": 20}`; '
        '`"out"` names a job\'s file.'
    )
    with gr.Row():
        with gr.Column():
            upload = gr.File(label="JSONL job file", elem_id="batch-file")
            with gr.Row():
                start = gr.Button("Run batch", variant="primary", elem_id="batch-start")
                stop = gr.Button("Stop", variant="stop", elem_id="batch-stop")
            summary = gr.Textbox(label="result", elem_id="batch-summary")
            archive = gr.File(label="all images as a zip", elem_id="batch-zip")
        with gr.Column():
            gallery = gr.Gallery(label="images (enlarged, crisp pixels; the zip holds the originals)", columns=4,
                                 format="png", elem_id="batch-gallery", elem_classes=[PIXELATED])

    @shows_errors
    def on_run(path: str | None, progress: gr.Progress = gr.Progress()) -> Iterator[tuple]:  # noqa: B008
        def work(cancel: threading.Event) -> tuple[list[str], str, str]:
            files, text, archive = run_batch_file(
                path, progress=lambda done, total: progress((done, total), desc="images"), cancel=cancel
            )
            return [(display_copy(f), batch_caption(f)) for f in files], text, archive

        yield from cancellable(work, (gr.skip(), gr.skip(), gr.skip()))

    running = start.click(
        on_run,
        inputs=upload,
        outputs=[gallery, summary, archive],
        api_name="batch",
        concurrency_id="pipeline",
        concurrency_limit=1,
    )
    stop.click(None, cancels=[running])  # the images made so far are kept on the server
