"""Send a generated image elsewhere in the page, as A1111's "Send to img2img" and kohya_ss's dataset buttons do.

- to Compose: its prompt (with any `<lora:...>` tags), model, seed and steps fill the Compose form;
- to Train: the PNG itself joins the training images (the data source switches to uploads).
Both then open the tab they filled.
"""

from __future__ import annotations

import hashlib
import shutil
import tempfile
from pathlib import Path
from typing import Any

import gradio as gr

from studio.errors import StudioError
from studio.ui.errors import shows_errors
from studio.ui.train_tab import UPLOAD


COMPOSE_KEYS = ("prompt", "model", "seed", "steps")


def compose_fields(params: dict[str, Any]) -> dict[str, Any]:
    """The Compose form's values for an image made with `params` (the studio's parameters of a PNG)."""
    return {key: params[key] for key in COMPOSE_KEYS if params.get(key) not in (None, "")}


def training_uploads(path: str | Path, params: dict[str, Any], uploads: list[str] | None) -> list[str]:
    """`uploads` plus the generated PNG at `path`, copied under a name of its own (seed and content), so several
    generated images never share one name; an image already there is not added twice."""
    path = Path(path)
    digest = hashlib.sha1(path.read_bytes()).hexdigest()[:10]
    name = f"generated-seed{params.get('seed', 0)}-{digest}.png"
    current = [str(u) for u in uploads or []]
    if any(Path(u).name == name for u in current):
        return current
    target = Path(tempfile.mkdtemp(prefix="studio-send-")) / name
    shutil.copyfile(path, target)
    return [*current, str(target)]


def wire_sends(tabs: gr.Tabs, generate: Any, compose: dict[str, Any], train: dict[str, Any]) -> None:
    """Connect the Generate tab's send buttons to the Compose and Train forms (`build_*_tab`'s components)."""
    targets = [compose[key] for key in COMPOSE_KEYS]

    @shows_errors
    def to_compose(record: dict | None) -> tuple[Any, ...]:
        if not record:
            raise StudioError("generate an image first (or pick one in the history), then send it")
        fields = compose_fields(record["params"])
        return (*[gr.update(value=fields[k]) if k in fields else gr.skip() for k in COMPOSE_KEYS],
                gr.Tabs(selected="compose"))  # fmt: skip

    generate.to_compose.click(to_compose, inputs=generate.current, outputs=[*targets, tabs], api_name=False)

    @shows_errors
    def to_train(record: dict | None, uploads: list[str] | None) -> tuple[Any, ...]:
        if not record:
            raise StudioError("generate an image first (or pick one in the history), then send it")
        files = training_uploads(record["path"], record["params"], uploads)
        gr.Info(f"{len(files)} training image(s) in the Train tab; 3 to 5 images of one concept work well")
        return files, UPLOAD, gr.Tabs(selected="train")

    generate.to_train.click(
        to_train, inputs=[generate.current, train["uploads"]], outputs=[train["uploads"], train["source"], tabs],
        api_name=False,
    )  # fmt: skip
