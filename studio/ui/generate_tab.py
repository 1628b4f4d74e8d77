"""The Generate tab: `studio.generate` with its sampler, several images shown as a grid, PNG parameters read back.

Images are written as `studio generate` writes them (`save_png`: A1111 `parameters` plus the studio's JSON), so a
downloaded image carries its parameters, and dropping such a PNG (or an A1111 one) fills the form again. The page
shows them enlarged with crisp pixels (`studio.ui.display`), each with its seed; the session's images stay in a
history whose every image restores the parameters it was made with, and the chosen image can be sent to the
Compose tab (its parameters) or to the Train tab (as a training image). Requests wait in Gradio's queue (the page
shows each one's place); Stop cancels a waiting request or stops a running one after its current step
(`studio.ui.cancel`).
"""

from __future__ import annotations

import dataclasses
import random
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import gradio as gr

from studio.generate import GenerateConfig, generate, save_result
from studio.models import DEFAULT_MODEL
from studio.pnginfo import a1111_text, read_parameters
from studio.schedulers import SAMPLER_NAMES, SCHEDULERS
from studio.ui.cancel import cancellable
from studio.ui.display import LABELLED, PIXELATED, display_copy
from studio.ui.errors import shows_errors
from studio.ui.fields import form_values


# settings of the CLI and API only, not in the form (memory savers stay automatic: on when the estimate needs them)
API_ONLY = ("clip_skip", "device", "cuda_graphs", "attention_slicing", "vae_tiling")
FIELDS = tuple(f.name for f in dataclasses.fields(GenerateConfig) if f.name not in API_ONLY)
# A1111 `parameters` keys -> GenerateConfig fields (studio PNGs carry the fields themselves as JSON)
A1111_KEYS = {"Steps": "steps", "CFG scale": "guidance", "Seed": "seed", "Size": "size", "Model": "model"}
HISTORY_LIMIT = 48  # images kept in a session's history (newest first)
SEED_RANGE = 2**32  # random seeds, as A1111 draws them


def config_from_form(fields: dict[str, Any]) -> GenerateConfig:
    """The form's values as a GenerateConfig; empty optional fields mean "the model's own"."""
    return GenerateConfig(**form_values(GenerateConfig, fields))


def run_generate(
    fields: dict[str, Any],
    progress: Callable[[int, int], None] | None = None,
    out_dir: Path | None = None,
    cancel: threading.Event | None = None,
) -> tuple[list[str], str, list[str]]:
    """Generate; returns (image paths, A1111 parameters text, downloadable files: the images and a grid)."""
    config = config_from_form(fields)
    result = generate(config, progress=progress, cancel=cancel)
    out_dir = Path(out_dir or tempfile.mkdtemp(prefix="studio-generate-"))
    files = [str(p) for p in save_result(result, out_dir / "image.png")]
    text = "\n\n".join(a1111_text(p) for p in result.params)
    return files[: len(result.images)], text, files


def fields_from_parameters(params: dict[str, Any]) -> dict[str, Any]:
    """Form fields from `read_parameters`: the studio's JSON as is, or A1111's parsed text mapped onto our names."""
    if "Steps" not in params and "Seed" not in params:
        return {k: params[k] for k in FIELDS if k in params and k != "num_images"}
    fields = {"prompt": params.get("prompt", ""), "negative": params.get("negative", "")}
    for key, name in A1111_KEYS.items():
        if key in params:
            fields[name] = params[key]
    if params.get("Sampler") in SAMPLER_NAMES:
        fields["scheduler"] = SAMPLER_NAMES[params["Sampler"]]
    for name, cast in (("steps", int), ("seed", int), ("guidance", float)):
        if name in fields:
            fields[name] = cast(fields[name])
    return fields


def read_png(path: str | None) -> tuple[str, dict[str, Any]]:
    """(A1111 text, form fields) of a dropped PNG."""
    if not path:
        return "", {}
    fields = fields_from_parameters(read_parameters(path))
    return a1111_text(fields), fields


def random_seed() -> int:
    """A fresh seed for the seed box (the Random seed button)."""
    return random.randrange(SEED_RANGE)


def image_records(paths: list[str]) -> list[dict[str, Any]]:
    """One record per generated PNG: its path (the original, with parameters) and the parameters it carries."""
    return [{"path": str(p), "params": read_parameters(p)} for p in paths]


def caption(params: dict[str, Any]) -> str:
    return f"seed {params.get('seed')}"


def gallery_items(records: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """(enlarged copy, "seed S") for a gallery; the originals stay in the records for download and sending."""
    return [(display_copy(r["path"]), caption(r["params"])) for r in records]


def restore_fields(params: dict[str, Any]) -> dict[str, Any]:
    """Form fields that make this one image again: its parameters, its own seed, one image."""
    return {**fields_from_parameters(params), "num_images": 1}


def add_to_history(history: list[dict[str, Any]], records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The newest images first, at most HISTORY_LIMIT."""
    return [*reversed(records), *history][:HISTORY_LIMIT]


@dataclasses.dataclass
class GenerateTab:
    """What the rest of the page wires to: the chosen image and the buttons that send it elsewhere."""

    current: gr.State  # the chosen image's record ({"path", "params"}), or None
    to_compose: gr.Button
    to_train: gr.Button


def build_generate_tab() -> GenerateTab:
    with gr.Row():
        with gr.Column():
            form = {
                "model": gr.Textbox(DEFAULT_MODEL, label="Model", elem_id="gen-model"),
                "prompt": gr.Textbox(
                    "a large red star on the left on a white background",
                    label="Prompt (<lora:name:weight> tags work)",
                    lines=2,
                    elem_id="gen-prompt",
                ),
                "negative": gr.Textbox("", label="Negative prompt", elem_id="gen-negative"),
            }
            with gr.Row(equal_height=True):
                form["seed"] = gr.Number(
                    0, label="Seed (image i uses seed + i)", precision=0, elem_id="gen-seed", scale=4, min_width=120
                )
                dice = gr.Button("Random seed", elem_id="gen-random-seed", scale=1, min_width=110)
            form.update(
                {
                    "steps": gr.Slider(1, 100, 20, step=1, label="Steps", elem_id="gen-steps"),
                    "guidance": gr.Textbox(
                        "", label="Guidance (empty: the model's recommended)", elem_id="gen-guidance"
                    ),
                    "guidance_rescale": gr.Textbox(
                        "", label="Guidance rescale 0-1 (empty: the model's recommended)", elem_id="gen-rescale"
                    ),
                    "scheduler": gr.Dropdown(
                        ["", *SCHEDULERS], value="", label="Sampler (empty: the model's own)", elem_id="gen-sampler"
                    ),
                    "size": gr.Textbox("", label="Size WxH (empty: the model's native)", elem_id="gen-size"),
                    "num_images": gr.Slider(1, 16, 1, step=1, label="Images", elem_id="gen-count"),
                }
            )
            with gr.Row():
                button = gr.Button("Generate", variant="primary", elem_id="gen-button")
                stop = gr.Button("Stop", variant="stop", elem_id="gen-stop")
        with gr.Column():
            gallery = gr.Gallery(
                label="Images (click one to choose it)",
                columns=4,
                height="auto",
                format="png",
                elem_id="gen-gallery",
                elem_classes=[PIXELATED, LABELLED],
            )
            with gr.Row():
                to_compose = gr.Button("Send to Compose", elem_id="gen-to-compose", min_width=120)
                to_train = gr.Button("Send to Train", elem_id="gen-to-train", min_width=120)
            info = gr.Textbox(label="Parameters", lines=4, elem_id="gen-info")
            files = gr.File(
                label="PNG files at their own size (with their parameters) and the grid",
                file_count="multiple",
                elem_id="gen-files",
            )
    history_gallery = gr.Gallery(
        label="History (newest first; click to restore)",
        columns=8,
        height=300,
        fit_columns=False,
        allow_preview=False,
        format="png",
        elem_id="gen-history",
        elem_classes=[PIXELATED, LABELLED],
    )
    with gr.Accordion("Read the parameters of a PNG", open=False):
        with gr.Row():
            dropped = gr.File(label="Drop a PNG made by the studio or A1111", type="filepath", elem_id="png-drop")
            with gr.Column():
                dropped_text = gr.Textbox(label="Its parameters", lines=4, elem_id="png-info")
                dropped_fields = gr.State({})
                use = gr.Button("Use these parameters")
    latest, history, current = gr.State([]), gr.State([]), gr.State(None)

    @shows_errors
    def on_generate(values: dict, progress: gr.Progress = gr.Progress()) -> Iterator[tuple]:  # noqa: B008
        fields = {name: values[component] for name, component in form.items()}

        def work(cancel: threading.Event) -> tuple[Any, ...]:
            images, text, paths = run_generate(
                fields, progress=lambda step, total: progress((step, total), desc="denoising"), cancel=cancel
            )
            records = image_records(images)
            past = add_to_history(values[history], records)
            return gallery_items(records), text, paths, records, past, gallery_items(past), records[0]

        yield from cancellable(work, (gr.skip(),) * 7)

    running = button.click(
        on_generate,
        inputs={*form.values(), history},
        outputs=[gallery, info, files, latest, history, history_gallery, current],
        api_name="generate",
        concurrency_id="pipeline",  # one shared pipeline cache with the Batch tab: one run at a time
        concurrency_limit=1,
    )
    dice.click(random_seed, outputs=form["seed"], api_name=False)

    def on_choose(records: list[dict], evt: gr.SelectData) -> dict | None:
        return records[evt.index] if 0 <= evt.index < len(records) else None

    gallery.select(on_choose, inputs=latest, outputs=current, api_name=False)

    def on_history(records: list[dict], evt: gr.SelectData) -> tuple[Any, ...]:
        record = records[evt.index]
        fields = restore_fields(record["params"])
        updates = [gr.update(value=fields[name]) if name in fields else gr.skip() for name in form]
        return (*updates, a1111_text(record["params"]), record)

    history_gallery.select(on_history, inputs=history, outputs=[*form.values(), info, current], api_name=False)
    stop.click(None, cancels=[running])  # drops a waiting request; a running one stops after its step

    @shows_errors
    def on_drop(path: str | None) -> tuple[str, dict]:
        return read_png(path)

    dropped.change(on_drop, inputs=dropped, outputs=[dropped_text, dropped_fields], api_name="read_png")

    def on_use(fields: dict) -> list:
        return [gr.update(value=fields[name]) if name in fields else gr.skip() for name in form]

    use.click(on_use, inputs=dropped_fields, outputs=list(form.values()))
    return GenerateTab(current, to_compose, to_train)
