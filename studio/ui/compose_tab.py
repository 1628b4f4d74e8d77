"""The Compose tab: several library adapters in one image (`composers.compose`), and a weight-sweep grid of two.

Adapters come from the adapters field (`NAME[:W],...`) and from `<lora:name:w>` tags in the prompt, exactly as
`studio compose` takes them (`composers.from_options`). The sweep draws one image per weight pair of two adapters,
the first adapter's weights down the rows and the second's across, with the same seed everywhere. LoRA-Composer
takes typed boxes (`NAME:x0,y0,x1,y1`, one per line, image fractions), or with none the boxes of the prompt's
position words (`composers.layout`); the layout is drawn over a blank canvas before composing and over the first
image after. The form shows only the options the chosen composer takes.
"""

from __future__ import annotations

import dataclasses
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import gradio as gr
from PIL import Image, ImageDraw

import composers
from studio.generate import GenerateConfig, make_grid
from studio.models import DEFAULT_MODEL
from studio.pnginfo import a1111_text, save_png
from studio.ui.display import PIXELATED, display_copy, display_image
from studio.ui.errors import shows_errors


SWEEP_WEIGHTS = (0.0, 0.5, 1.0)
# the form's composer options, each with the config field of the composers that take it
OPTION_FIELDS = {"tau": "tau", "order": "order", "cache": "cache", "concept_masks": "place_masks", "boxes": "boxes"}
FRAME = (200, 200, 200)
LAYOUT_COLOURS = ("#e6194b", "#3cb4e6", "#f0a000", "#3cb44b", "#911eb4", "#808080")


def box_lines(text: str | None) -> list[str]:
    """The typed boxes field: one `NAME:x0,y0,x1,y1` per line (or separated by `;`)."""
    return [b.strip() for b in (text or "").replace(";", "\n").splitlines() if b.strip()]


def draw_layout(boxes_text: str | None, image: Image.Image | None = None, size: int = 256) -> Image.Image:
    """The boxes drawn, labelled, over `image` enlarged to `size` (a white canvas without one)."""
    boxes = composers.parse_boxes(box_lines(boxes_text))
    canvas = (image.convert("RGB").resize((size, size), Image.NEAREST) if image is not None
              else Image.new("RGB", (size, size), "white"))
    draw = ImageDraw.Draw(canvas)
    draw.rectangle([0, 0, size - 1, size - 1], outline=FRAME)  # the image's bounds, on a white page too
    for i, (name, (x0, y0, x1, y1)) in enumerate(boxes.items()):
        colour = LAYOUT_COLOURS[i % len(LAYOUT_COLOURS)]
        draw.rectangle([x0 * size, y0 * size, x1 * size - 1, y1 * size - 1], outline=colour, width=3)
        draw.text((x0 * size + 5, y0 * size + 4), name, fill=colour)
    return canvas


def shown_options(composer: str | None) -> dict[str, bool]:
    """Which of the form's composer options `composer` takes: the tab shows those and hides the rest."""
    takes = {f.name for f in dataclasses.fields(composers.make_config(composer or "merge"))}
    return {name: field in takes for name, field in OPTION_FIELDS.items()}


def compose_options(fields: dict[str, Any]) -> tuple[str, composers.AdapterSet, Any]:
    """The form as `composers.from_options` reads it: (prompt without tags, adapter set, composer config). The form
    holds every composer's options; each goes only to the composers that take it (the tab shows them), so a value
    left in a hidden field cannot fail another composer."""
    composer = fields.get("composer") or "merge"
    shown = shown_options(composer)
    return composers.from_options(
        fields["prompt"], fields.get("adapters") or "", composer,
        tau=int(fields["tau"]) if shown["tau"] and fields.get("tau") else None,
        order=(fields.get("order") or None) if shown["order"] else None,
        no_cache=shown["cache"] and fields.get("cache") is False,
        boxes=(box_lines(fields.get("boxes")) or None) if shown["boxes"] else None,
        concept_masks=shown["concept_masks"] and bool(fields.get("concept_masks")),
    )


def layout_lines(fields: dict[str, Any]) -> str:
    """The boxes a composition used, typed or read from the prompt's position words, as the boxes field writes
    them ("" for a composer without boxes)."""
    if not shown_options(fields.get("composer"))["boxes"]:
        return ""
    typed = box_lines(fields.get("boxes"))
    if typed:
        return "\n".join(typed)
    boxes = compose_options(fields)[2].boxes
    return "\n".join(f"{n}:{','.join(f'{v:g}' for v in box)}" for n, box in boxes.items())


def run_compose(
    fields: dict[str, Any], progress: Callable[[int, int], None] | None = None, out_dir: Path | None = None
) -> tuple[list[str], str]:
    """Compose; returns (PNG paths with their parameters, A1111 parameters text)."""
    prompt, adapters, config = compose_options(fields)
    generate_config = GenerateConfig(prompt=prompt, model=fields.get("model") or DEFAULT_MODEL,
                                     seed=int(fields.get("seed") or 0), steps=int(fields.get("steps") or 20))
    result = composers.compose(generate_config, adapters, fields.get("composer") or "merge", config,
                               progress=progress)
    out_dir = Path(out_dir or tempfile.mkdtemp(prefix="studio-compose-"))
    paths = []
    for i, (image, params) in enumerate(zip(result.images, result.params)):
        paths.append(str(save_png(image, out_dir / f"compose-{i:03d}.png", params)))
    return paths, "\n\n".join(a1111_text(p) for p in result.params)


def run_compose_by_prompt(
    fields: dict[str, Any], progress: Callable[[int, int], None] | None = None, out_dir: Path | None = None
) -> tuple[list[str], str, str]:
    """AutoLoRA: retrieve the adapters by the prompt and fuse them with gates (`studio compose --composer autolora`
    with no adapters named); returns (PNG paths, parameters text, what was retrieved)."""
    from studio.library.retrieval import retrieve

    found = retrieve(fields["prompt"], composers.AutoLoRAConfig().k)
    retrieved = "\n".join(f"{i}. {r.name}  score {r.score:.3f}" for i, r in enumerate(found, 1))
    paths, text = run_compose({**fields, "adapters": "", "composer": "autolora"}, progress, out_dir)
    return paths, text, retrieved


def run_sweep(
    fields: dict[str, Any],
    weights: tuple[float, ...] = SWEEP_WEIGHTS,
    progress: Callable[[int, int], None] | None = None,
) -> Image.Image:
    """A grid of weighted merges of the first two adapters: row i = first adapter at weights[i], column j = second."""
    from studio.errors import StudioError

    prompt, adapters, _ = composers.from_options(fields["prompt"], fields.get("adapters") or "")
    if len(adapters.names) != 2:
        raise StudioError(f"the sweep takes exactly two adapters, got {len(adapters.names)}; name two in Adapters")
    a, b = adapters.names
    config = GenerateConfig(prompt=prompt, model=fields.get("model") or DEFAULT_MODEL,
                            seed=int(fields.get("seed") or 0), steps=int(fields.get("steps") or 20))
    images = []
    for i, wa in enumerate(weights):
        for j, wb in enumerate(weights):
            pair = composers.AdapterSet([a, b], [wa, wb])
            images += composers.compose(config, pair, "merge").images
            if progress is not None:
                progress(i * len(weights) + j + 1, len(weights) ** 2)
    return make_grid(images, columns=len(weights))


def build_compose_tab() -> dict[str, Any]:
    with gr.Row():
        with gr.Column():
            shown = shown_options("merge")  # the options of the composer selected first; the others hidden
            form = {
                "model": gr.Textbox(DEFAULT_MODEL, label="Model", elem_id="compose-model"),
                "prompt": gr.Textbox("", label="Prompt (<lora:name:weight> tags add adapters)", lines=2,
                                     elem_id="compose-prompt"),
                "adapters": gr.Textbox("", label="Adapters NAME[:W],NAME[:W]...", elem_id="compose-adapters"),
                "composer": gr.Radio(list(composers.COMPOSERS), value="merge", label="Composer",
                                     elem_id="compose-composer"),
                "tau": gr.Number(5, label="Switch: steps per adapter (tau)", precision=0, visible=shown["tau"],
                                 elem_id="compose-tau"),
                "order": gr.Textbox("", label="Switch: order a,b,... (empty: subject, style, then the rest); "
                                    "CMLoRA: integration order (empty: measured by Fourier profiling)",
                                    visible=shown["order"], elem_id="compose-order"),
                "cache": gr.Checkbox(True, label="CMLoRA: reuse non-dominant adapters' deep features (faster)",
                                     visible=shown["cache"], elem_id="compose-cache"),
                "concept_masks": gr.Checkbox(False, label="CLoRA: masks from each subject's own words (the paper's) "
                                             "instead of its position words", visible=shown["concept_masks"],
                                             elem_id="compose-concept-masks"),
                "boxes": gr.Textbox("", lines=2, label="Boxes (MultiDiffusion, LoRA-Composer): NAME:x0,y0,x1,y1 per "
                                    "line (fractions, origin top-left; empty: from the prompt's places, such as "
                                    "'on the left')", elem_id="compose-boxes",
                                    visible=shown["boxes"]),
                "seed": gr.Number(0, label="Seed", precision=0, elem_id="compose-seed"),
                "steps": gr.Slider(1, 100, 20, step=1, label="Steps", elem_id="compose-steps"),
            }
            with gr.Row():
                button = gr.Button("Compose", variant="primary", elem_id="compose-button")
                sweep = gr.Button("Weight sweep of two adapters", elem_id="compose-sweep")
                preview = gr.Button("Preview layout", elem_id="compose-preview", visible=shown["boxes"])
            by_prompt = gr.Button("Compose by prompt (AutoLoRA: retrieve the adapters, fuse them with gates)",
                                  elem_id="compose-by-prompt")
        with gr.Column():
            gallery = gr.Gallery(label="Images (enlarged, crisp pixels)", columns=2, format="png",
                                 elem_id="compose-gallery", elem_classes=[PIXELATED])
            retrieved = gr.Textbox(label="Retrieved by the prompt (compose by prompt)", lines=2,
                                   elem_id="compose-retrieved")
            info = gr.Textbox(label="Parameters", lines=4, elem_id="compose-info")
            files = gr.File(label="PNG files at their own size (with their parameters)", file_count="multiple",
                            elem_id="compose-files")
            layout = gr.Image(label="Layout: the boxes (over the first image after composing)", type="pil",
                              format="png", elem_id="compose-layout", visible=shown["boxes"])
            grid = gr.Image(label=f"Sweep: rows first adapter, columns second, weights {SWEEP_WEIGHTS}",
                            type="pil", format="png", elem_id="compose-grid", elem_classes=[PIXELATED])

    def values_of(values: dict) -> dict[str, Any]:
        return {name: values[component] for name, component in form.items()}

    @shows_errors
    def on_compose(values: dict, progress: gr.Progress = gr.Progress()) -> tuple:  # noqa: B008
        fields = values_of(values)
        paths, text = run_compose(fields, progress=lambda s, t: progress((s, t), desc="denoising"))
        layout = layout_lines(fields)  # typed, or from the prompt's position words
        drawn = draw_layout(layout, Image.open(paths[0])) if layout else None
        return [display_copy(p) for p in paths], text, paths, drawn

    @shows_errors
    def on_preview(values: dict) -> Image.Image:
        return draw_layout(layout_lines(values_of(values)))

    @shows_errors
    def on_by_prompt(values: dict, progress: gr.Progress = gr.Progress()) -> tuple[list, str, list, str]:  # noqa: B008
        paths, text, found = run_compose_by_prompt(values_of(values),
                                                   progress=lambda s, t: progress((s, t), desc="denoising"))
        return [display_copy(p) for p in paths], text, paths, found

    @shows_errors
    def on_sweep(values: dict, progress: gr.Progress = gr.Progress()) -> Image.Image:  # noqa: B008
        return display_image(run_sweep(values_of(values), progress=lambda s, t: progress((s, t), desc="sweep")))

    def on_composer(composer: str) -> list:
        shown = shown_options(composer)
        return [gr.update(visible=v) for v in (*shown.values(), shown["boxes"], shown["boxes"])]

    form["composer"].change(on_composer, inputs=form["composer"],
                            outputs=[*(form[n] for n in OPTION_FIELDS), preview, layout], api_name=False)
    shared = {"concurrency_id": "pipeline", "concurrency_limit": 1}  # the pipeline cache is shared with Generate
    button.click(on_compose, inputs=set(form.values()), outputs=[gallery, info, files, layout], api_name="compose",
                 **shared)
    preview.click(on_preview, inputs=set(form.values()), outputs=layout, api_name="layout")
    by_prompt.click(on_by_prompt, inputs=set(form.values()), outputs=[gallery, info, files, retrieved],
                    api_name="compose_by_prompt", **shared)
    sweep.click(on_sweep, inputs=set(form.values()), outputs=grid, api_name="sweep", **shared)
    return form
