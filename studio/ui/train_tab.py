"""The Train tab: `trainers.train` through the job queue, with live progress, loss curve, previews, cancel, resume.

The form's fields are `TrainConfig`'s (see `studio.ui.fields`); `configs_from_mapping` turns them into the method
and run configs exactly as `studio train` does. A finished run lands in the library (the Library tab shows it), and
its sample prompts are rendered with and without the new adapter, side by side (`studio.compare.compare_adapter`).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import gradio as gr

from studio.errors import StudioError
from studio.library.store import check_name
from studio.plots import loss_series
from studio.ui.display import LABELLED, PIXELATED
from studio.ui.errors import shows_errors
from studio.ui.fields import field_input, form_values
from studio.ui.jobs import Job, JobQueue
from studio.ui.train_view import COLOURS, LOG_LOSS, LOSS, comparison_items, job_series, loss_frame, preview_items
from studio.ui.uploads import check_uploads, dataset_dir, save_dataset
from studio.world.textures import TEXTURES
from trainers import METHODS, Callbacks, TrainConfig, configs_from_mapping, train


log = logging.getLogger(__name__)
EMBLEM, TEXTURE, UPLOAD = "Shapes World emblem", "Shapes World texture", "Upload images"
TEXTURED = "Shapes World textured emblem"  # the emblem filled with the texture (B-LoRA: its content and style)
SOURCE_FIELDS = ("source", "uploads", "world_emblem", "world_texture")
# The main settings shown in the form (the rest keep TrainConfig's defaults, as `studio train` without the flag).
MAIN_ROWS = (("trigger", "name"), ("model",), ("train_steps", "rank", "lr"), ("batch_size", "resolution", "seed"))
MORE_FIELDS = (
    "world_images",
    "world_objects",
    "sample_every",
    "sample_steps",
    "save_every",
    "lr_scheduler",
    "grad_accum",
    "device",
    "mixed_precision",
    "gradient_checkpointing",
    "snr_gamma",
    "prior_preservation",
    "class_prompt",
    "num_class_images",
    "instance_prompt",
)
SHARED = ("lr", "rank")  # method options the main rows already show (TrainConfig's --lr and --rank)


def method_fields(method: str) -> list[str]:
    """The options of a method's config shown in its own group (`studio train --help` lists the same)."""
    import dataclasses

    common = {f.name for f in dataclasses.fields(TrainConfig)}  # a method field of the same name (orthogonal's
    # trigger) is filled from the run's own, as `studio train` does
    return [f.name for f in dataclasses.fields(METHODS[method].config_cls) if f.name not in SHARED and f.name not in
            common]


def option_key(method: str, name: str) -> str:
    return f"{method}.{name}"


def train_options(form: dict[str, Any], *, resume: bool = False) -> tuple[dict[str, Any], list[Path]]:
    """Flat `studio train` options from the form, and the checked uploads (empty unless images are uploaded)."""
    values = dict(form)
    source, uploads = values.pop("source"), values.pop("uploads")
    emblem, texture = values.pop("world_emblem"), values.pop("world_texture")
    method = values.pop("method")
    own: dict[str, Any] = {}
    for key in [k for k in values if "." in k]:  # every method's group is in the form; only the chosen one counts
        group, name = key.split(".", 1)
        value = values.pop(key)
        if group == method:
            own[name] = value
    own = form_values(METHODS[method].config_cls, own) if method in METHODS else {}  # an unknown one: refused below
    options = {"method": method, **form_values(TrainConfig, values), **own, "progress": False}
    if resume:
        options["resume"] = "latest"
    checked: list[Path] = []
    if source in (EMBLEM, TEXTURED):
        if emblem is None:
            raise StudioError("give the emblem's seed (any whole number picks one emblem)")
        options["world_emblem"] = int(emblem)
        if source == TEXTURED:
            if texture in (None, "solid"):
                raise StudioError("pick a texture to fill the emblem with (stripes, dots, ...)")
            options["world_texture"] = texture
    elif source == TEXTURE:
        options["world_texture"] = texture
    else:
        folder = dataset_dir(check_name(options.get("name", "")))
        if not (resume and folder.is_dir()):  # a resumed run keeps the images it started with
            checked = check_uploads(uploads)
        options["images"] = str(folder)
    return options, checked


def submit_training(jobs: JobQueue, form: dict[str, Any], *, resume: bool = False) -> Job:
    """Check the form, then queue the run; it starts when the jobs ahead of it are done."""
    options, uploads = train_options(form, resume=resume)
    method, config = configs_from_mapping(options)
    jobs.check_free(config.name)
    if uploads:
        save_dataset(uploads, dataset_dir(config.name))

    def work(job: Job) -> tuple[str, str]:
        callbacks = Callbacks(
            on_step=job.report_step, on_sample=job.report_previews, on_checkpoint=job.report_checkpoint
        )
        result = train(method, config, callbacks=callbacks, cancel=job.cancel)
        if result.status != "done":
            return "cancelled", (
                f"{config.name} stopped at step {result.step} of {config.train_steps}; Resume continues it"
            )
        message = f"{config.name} is in the library ({result.step} steps, final loss {result.losses[-1]:.4f})"
        result.pipe = result.method = None  # the comparison loads the base afresh: free the trained copy first
        names = [entry.name for entry in result.entries] or [config.name]
        if len(names) > 1:
            message += f" as {', '.join(names)} (use them in Generate or Compose, alone or together)"
        return "done", message + side_by_side(job, config, result.sample_prompts, names[0])

    label = f"{config.name} ({method.method}{', resumed' if resume else ''})"
    return jobs.submit(label, config.train_steps, work, key=config.name)


def side_by_side(job: Job, config: Any, prompts: list[str], adapter: str | None = None) -> str:
    """Render the run's sample prompts without and with its new adapter (the previews' seeds, steps and size) for
    the job to show; returns a note for the job's message when that could not be done."""
    from studio.compare import compare_adapter
    from studio.generate import resolve_device
    from studio.models import load_pipeline

    if not prompts:
        return ""
    job.report_phase(f"rendering {len(prompts)} sample prompt(s) with and without the adapter")
    size = "{}x{}".format(*job.previews[0].size) if job.previews else None
    try:
        device = resolve_device(config.device)
        pipe = load_pipeline(config.model, device=device)  # its own copy: the page's cached one may be in use
        comparison = compare_adapter(adapter or config.name, prompts, model=config.model, seed=config.seed,
                                     steps=config.sample_steps, size=size, device=device, pipe=pipe)  # fmt: skip
    except Exception as err:  # the adapter is in the library already: the run stays done, the note says why
        log.exception("side-by-side of %s failed", config.name)
        return f"; the side-by-side could not be rendered ({type(err).__name__}: {err})"
    finally:
        job.phase = ""
    job.report_comparison(comparison.pairs())
    return ""


def job_rows(jobs: JobQueue) -> list[list[Any]]:
    return [[j.id, j.label, j.state, f"{j.step}/{j.total}", jobs.status(j)] for j in reversed(jobs.jobs())]


def job_view(jobs: JobQueue, job_id: int | None, seen: tuple[int, int]) -> tuple[Any, ...]:
    """(status, loss curve, previews, side-by-side, jobs table, seen) of the watched job.

    `seen` is the (version, preview version) the page shows: unchanged curves and images are not sent again.
    A job that failed since the last look also pops up its error.
    """
    job = jobs.get(job_id)
    if job is None:
        return "no training yet", gr.skip(), gr.skip(), gr.skip(), job_rows(jobs), seen
    version, preview_version = seen
    if job.version == version:
        return jobs.status(job), gr.skip(), gr.skip(), gr.skip(), job_rows(jobs), seen
    if job.state == "failed":
        gr.Warning(jobs.status(job))
    curve = loss_frame(job_series(job))
    if job.preview_version != preview_version:
        previews, comparison = preview_items(job), comparison_items(job)
    else:
        previews = comparison = gr.skip()
    return jobs.status(job), curve, previews, comparison, job_rows(jobs), (job.version, job.preview_version)


def chart_axis(log_scale: bool) -> dict[str, Any]:
    """The loss chart's y column and title: the loss, or its log10 for a log scale."""
    if log_scale:
        return {"y": LOG_LOSS, "y_title": "log10(loss), log scale"}
    return {"y": LOSS, "y_title": "loss (MSE)"}


def build_train_tab(jobs: JobQueue) -> dict[str, Any]:
    with gr.Row():
        with gr.Column():
            form: dict[str, Any] = {
                "method": gr.Dropdown(list(METHODS), value="dreambooth_lora", label="method", elem_id="train-method"),
                "source": gr.Radio([EMBLEM, TEXTURE, TEXTURED, UPLOAD], value=EMBLEM, elem_id="train-source",
                                   label="data (b_lora learns one image: one render, or one uploaded image)"),
                "world_emblem": field_input(TrainConfig, "world_emblem", value=7),
                "world_texture": gr.Dropdown(
                    list(TEXTURES), value="stripes", label="texture (a style)", visible=False, elem_id="train-texture"
                ),
                "uploads": gr.File(
                    file_count="multiple",
                    label="training images (3 to 5 work well; same-named .txt files are captions; "
                    "at most 200 images of 20 MB each)",
                    visible=False,
                    elem_id="train-uploads",
                ),
            }
            for row in MAIN_ROWS:
                with gr.Row():
                    form.update({name: field_input(TrainConfig, name) for name in row})
            groups = {}
            for key in METHODS:
                cls = METHODS[key].config_cls
                with gr.Accordion(f"{key} settings", open=False, visible=key == "dreambooth_lora") as groups[key]:
                    form.update({option_key(key, n): field_input(cls, n, elem_id=f"{key}-{n}".replace("_", "-"))
                                 for n in method_fields(key)})
            with gr.Accordion("More settings", open=False):
                form.update({name: field_input(TrainConfig, name) for name in MORE_FIELDS})
            with gr.Row():
                start = gr.Button("Start training", variant="primary", elem_id="train-start")
                cancel = gr.Button("Cancel", variant="stop", elem_id="train-cancel")
                resume = gr.Button("Resume", elem_id="train-resume")
        with gr.Column():
            status = gr.Textbox(
                "no training yet", label="status (with the estimated time left)", lines=2, elem_id="train-status"
            )
            curve = gr.LinePlot(
                loss_frame(loss_series([])),  # typed from the start: the chart keeps its first axis types
                x="step",
                color="series",
                color_map=COLOURS,
                label="training loss",  # not shown: the legend names the lines (raw, smoothed, last checkpoint)
                show_label=False,
                height=280,
                tooltip="all",
                elem_id="train-loss",
                **chart_axis(False),
            )
            log_scale = gr.Checkbox(False, label="log scale", elem_id="train-log-scale")
            previews = gr.Gallery(
                label="previews (step · prompt)",
                columns=4,
                height="auto",
                format="png",
                elem_id="train-previews",
                elem_classes=[PIXELATED, LABELLED],
            )
            comparison = gr.Gallery(
                label="after training: without | with the adapter",
                columns=4,
                height="auto",
                format="png",
                elem_id="train-compare",
                elem_classes=[PIXELATED, LABELLED],
            )
            table = gr.Dataframe(
                headers=["job", "adapter", "state", "step", "status"], label="job queue", elem_id="train-jobs"
            )
    watched, seen = gr.State(None), gr.State((-1, -1))

    def on_source(source: str) -> tuple[Any, ...]:
        return (
            gr.update(visible=source in (EMBLEM, TEXTURED)),
            gr.update(visible=source in (TEXTURE, TEXTURED)),
            gr.update(visible=source == UPLOAD),
            gr.update(visible=source != UPLOAD),
            gr.update(visible=source == EMBLEM),
        )

    form["method"].change(
        lambda method: tuple(gr.update(visible=key == method) for key in groups),
        inputs=form["method"],
        outputs=list(groups.values()),
    )
    form["source"].change(
        on_source,
        inputs=form["source"],
        outputs=[form["world_emblem"], form["world_texture"], form["uploads"], form["world_images"],
                 form["world_objects"]],
    )

    def submit(values: dict, resume_run: bool) -> tuple[int, str, tuple[int, int]]:
        job = submit_training(jobs, {name: values[c] for name, c in form.items()}, resume=resume_run)
        return job.id, jobs.status(job), (-1, -1)

    start.click(
        shows_errors(lambda values: submit(values, False)),
        inputs=set(form.values()),
        outputs=[watched, status, seen],
        concurrency_limit=None,
        trigger_mode="multiple",
        api_name="train",
    )
    resume.click(
        shows_errors(lambda values: submit(values, True)),
        inputs=set(form.values()),
        outputs=[watched, status, seen],
        concurrency_limit=None,
        api_name="resume",
    )

    def on_cancel(job_id: int | None) -> str:
        job = jobs.cancel(job_id) if job_id is not None else None
        return jobs.status(job) if job else "no job to cancel"

    cancel.click(on_cancel, inputs=watched, outputs=status, concurrency_limit=None)

    log_scale.change(lambda log: gr.LinePlot(**chart_axis(log)), inputs=log_scale, outputs=curve, api_name=False)

    timer = gr.Timer(1.0)
    timer.tick(
        lambda job_id, version: job_view(jobs, job_id, version),
        inputs=[watched, seen],
        outputs=[status, curve, previews, comparison, table, seen],
        concurrency_limit=None,
        show_progress="hidden",
    )
    return form
