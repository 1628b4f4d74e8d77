"""The LoRA Studio page: one `gr.Blocks`, tabs Generate, Train, Library, Compose, Batch and Benchmarks over the Python
API."""

from __future__ import annotations

import gradio as gr

from studio.ui.batch_tab import build_batch_tab
from studio.ui.bench_tab import build_bench_tab
from studio.ui.compose_tab import build_compose_tab
from studio.ui.generate_tab import build_generate_tab
from studio.ui.jobs import JobQueue
from studio.ui.library_tab import build_library_tab
from studio.ui.send import wire_sends
from studio.ui.train_tab import build_train_tab


def build_app(jobs: JobQueue | None = None) -> gr.Blocks:
    """The whole app; `jobs` is the training queue (a new one by default). `launch` adds the page's CSS."""
    jobs = jobs or JobQueue()
    with gr.Blocks(title="LoRA Studio") as demo:
        gr.Markdown("# LoRA Studio")
        with gr.Tabs(elem_id="tabs") as tabs:
            with gr.Tab("Generate", id="generate", elem_id="tab-generate"):
                generate = build_generate_tab()
            with gr.Tab("Train", id="train", elem_id="tab-train"):
                train = build_train_tab(jobs)
            build_library_tab()
            with gr.Tab("Compose", id="compose", elem_id="tab-compose"):
                compose = build_compose_tab()
            with gr.Tab("Batch", id="batch", elem_id="tab-batch"):
                build_batch_tab()
            build_bench_tab(jobs)  # a quick report waits in the same queue as training
        wire_sends(tabs, generate, compose, train)
    demo.jobs = jobs  # for scripts and tests: the queue behind the Train tab
    return demo
