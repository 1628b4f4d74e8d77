"""`python app.py [--host H] [--port P] [--auth user:pass]`: serve the page, on this machine only by default."""

from __future__ import annotations

import argparse
from typing import Any

import gradio as gr

from studio.paths import library_dir
from studio.ui.display import CSS


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


def launch(
    demo: gr.Blocks, host: str = "127.0.0.1", port: int = 7860, auth: tuple[str, str] | None = None, **kwargs: Any
) -> Any:
    """Queue and serve `demo` with the page's CSS; the library folder may be served (its previews), nothing else
    outside the temp dir."""
    library = library_dir()
    library.mkdir(parents=True, exist_ok=True)
    demo.queue(default_concurrency_limit=1)
    return demo.launch(
        server_name=host,
        server_port=port,
        auth=auth,
        allowed_paths=[str(library.resolve())],
        show_error=True,
        css=CSS + kwargs.pop("css", ""),
        **kwargs,
    )


def main(argv: list[str] | None = None) -> None:
    from studio.ui.app import build_app

    args = parse_args(argv)
    launch(build_app(), args.host, args.port, args.auth_pair)
