"""The Benchmarks tab: the latest `studio bench report` (its tables and figures), and a quick report started from
the page through the job queue that training uses (it waits behind training runs and shows which part it is on).

Reports live where `studio bench report` writes them ($STUDIO_BENCH_OUT/report and report-quick); the newest one
is shown. A quick run reuses every part of an earlier run whose key (code and settings) still matches.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import gradio as gr

from benches.report import Cancelled, default_out, run_report
from studio.ui.errors import shows_errors
from studio.ui.jobs import Job, JobQueue


KEY = "benchmark report"  # the queue refuses a second unfinished report job
_IMAGE_LINK = re.compile(r"!\[[^\]]*\]\([^)]*\)")  # figures are shown in the gallery, not as links into the folder
INTRO = ("Every trainer and composer of the studio, scored exactly by the Shapes World evaluator on the embedded base "
         "(`studio bench report`). **Run the quick report** queues a short run (12 minutes on 2 idle CPU cores; fewer "
         "steps and seeds, stated in the report; it still trains an adapter per method) behind any training in "
         "progress.")


def latest_report() -> Path | None:
    """The newest report folder (full or quick) that holds a report.json."""
    found = [d for d in (default_out(False), default_out(True)) if (d / "report.json").is_file()]
    return max(found, key=lambda d: (d / "report.json").stat().st_mtime, default=None)


def report_view(folder: Path | None) -> tuple[str, list[tuple[Any, str]], list[tuple[Any, str]]]:
    """(tables as Markdown, figures, example grids) of the report in `folder`."""
    import json

    from PIL import Image

    if folder is None:
        return "No report yet: run the quick report below, or `studio bench report --quick`.", [], []
    text = _IMAGE_LINK.sub("", (folder / "report.md").read_text())
    text = text.split("\n## Figures", 1)[0]  # the figures and grids follow as images
    report = json.loads((folder / "report.json").read_text())
    figures = [(Image.open(folder / name).convert("RGB"), name) for name in report.get("figures", [])
               if (folder / name).is_file()]
    grids = [(Image.open(folder / path).convert("RGB"), name) for name, path in report.get("grids", {}).items()
             if path and (folder / path).is_file()]
    return f"Report in `{folder}`\n\n{text}", figures, grids


def submit_report(jobs: JobQueue, out: Path | None = None) -> Job:
    """Queue a quick report into `out` (default: where `studio bench report --quick` writes)."""
    folder = out or default_out(True)

    def work(job: Job) -> tuple[str, str]:
        def progress(done: int, total: int, unit: str) -> None:
            job.total, job.step = total, done
            job.report_phase(f"part {min(done + 1, total)} of {total}: {unit}")

        try:
            run_report(folder, quick=True, progress=progress, cancel=job.cancel, log=lambda _: None)
        except Cancelled as err:
            return "cancelled", str(err)
        return "done", f"the quick report is in {folder}"

    return jobs.submit("quick benchmark report", 1, work, key=KEY)


def build_bench_tab(jobs: JobQueue) -> None:
    """The tab (inside the page's gr.Tabs); it reads the latest report each time it is opened."""
    with gr.Tab("Benchmarks", id="benchmarks", elem_id="tab-benchmarks") as tab:
        gr.Markdown(INTRO)
        with gr.Row():
            start = gr.Button("Run the quick report", variant="primary", elem_id="bench-start")
            cancel = gr.Button("Cancel", variant="stop", elem_id="bench-cancel")
            refresh = gr.Button("Show the latest report", elem_id="bench-refresh")
        status = gr.Textbox("no report running", label="status", elem_id="bench-status", interactive=False)
        figures = gr.Gallery(label="figures", columns=2, height="auto", format="png", object_fit="contain",
                             elem_id="bench-figures")
        tables = gr.Markdown(elem_id="bench-tables")
        grids = gr.Gallery(label="example images (one row per bench row)", columns=1, height="auto", format="png",
                           elem_id="bench-grids")
        watched, seen = gr.State(None), gr.State(-1)

    def show() -> tuple[Any, ...]:
        return report_view(latest_report())

    def on_start() -> tuple[int, str, int]:
        job = submit_report(jobs)
        return job.id, jobs.status(job), -1

    def on_cancel(job_id: int | None) -> str:
        job = jobs.cancel(job_id) if job_id is not None else None
        return jobs.status(job) if job else "no report running"

    def poll(job_id: int | None, version: int) -> tuple[Any, ...]:
        job = jobs.get(job_id)
        if job is None or job.version == version:
            return (gr.skip(),) * 4 + (version,)
        if job.state == "done":
            return (jobs.status(job), *show(), job.version)
        return (jobs.status(job), gr.skip(), gr.skip(), gr.skip(), job.version)

    start.click(shows_errors(on_start), outputs=[watched, status, seen], concurrency_limit=None, api_name="bench")
    cancel.click(on_cancel, inputs=watched, outputs=status, concurrency_limit=None)
    refresh.click(show, outputs=[tables, figures, grids], concurrency_limit=None)
    timer = gr.Timer(1.0)
    timer.tick(poll, inputs=[watched, seen], outputs=[status, tables, figures, grids, seen], concurrency_limit=None,
               show_progress="hidden")
    tab.select(show, outputs=[tables, figures, grids], concurrency_limit=None, show_progress="hidden")
