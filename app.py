"""LoRA Studio web UI: a Gradio view over the Python API (`studio.generate`, ...).

    python app.py [--host 127.0.0.1] [--port 7860] [--auth user:pass]

Binds to 127.0.0.1 unless told otherwise. Every action calls the same public functions as the CLI.
"""

from __future__ import annotations

import argparse
from typing import Any

import gradio as gr

from studio.errors import StudioError
from studio.generate import GenerateConfig, generate
from studio.models import DEFAULT_MODEL
from studio.schedulers import SCHEDULERS


def run_generate(values: dict[Any, Any], components: dict[str, Any], progress: gr.Progress) -> tuple[list, str]:
    fields = {name: values[component] for name, component in components.items()}
    fields["scheduler"] = fields["scheduler"] or None
    fields["size"] = fields["size"] or None
    for name in ("seed", "steps", "num_images"):
        fields[name] = int(fields[name])
    try:
        config = GenerateConfig(**fields)
        result = generate(config, progress=lambda step, total: progress((step, total), desc="denoising"))
    except StudioError as err:
        raise gr.Error(str(err)) from err
    from studio.pnginfo import a1111_text

    return result.images, "\n\n".join(a1111_text(p) for p in result.params)


def build_app() -> gr.Blocks:
    with gr.Blocks(title="LoRA Studio") as demo:
        gr.Markdown("# LoRA Studio")
        with gr.Tab("Generate"):
            with gr.Row():
                with gr.Column():
                    components = {
                        "model": gr.Textbox(DEFAULT_MODEL, label="Model"),
                        "prompt": gr.Textbox("a large red star on the left on a white background", label="Prompt"),
                        "negative": gr.Textbox("", label="Negative prompt"),
                        "seed": gr.Number(0, label="Seed", precision=0),
                        "steps": gr.Slider(1, 100, 20, step=1, label="Steps"),
                        "guidance": gr.Slider(1.0, 15.0, 7.5, step=0.5, label="Guidance"),
                        "scheduler": gr.Dropdown(["", *SCHEDULERS], value="", label="Sampler (empty: model's own)"),
                        "size": gr.Textbox("", label="Size WxH (empty: model's native)"),
                        "num_images": gr.Slider(1, 16, 1, step=1, label="Images"),
                    }
                    button = gr.Button("Generate", variant="primary")
                with gr.Column():
                    gallery = gr.Gallery(label="Images", columns=2)
                    info = gr.Textbox(label="Parameters", lines=4)

            def on_generate(values: dict, progress: gr.Progress = gr.Progress()) -> tuple[list, str]:  # noqa: B008
                return run_generate(values, components, progress)

            button.click(on_generate, inputs=set(components.values()), outputs=[gallery, info], api_name="generate")
    return demo


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="LoRA Studio web UI")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--auth", default=None, help="user:pass required to open the app")
    args = parser.parse_args(argv)
    args.auth_pair = None
    if args.auth:
        user, sep, password = args.auth.partition(":")
        if not sep or not user or not password:
            parser.error("--auth must look like user:pass")
        args.auth_pair = (user, password)
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    demo = build_app().queue(default_concurrency_limit=1)
    demo.launch(server_name=args.host, server_port=args.port, auth=args.auth_pair)


if __name__ == "__main__":
    main()
