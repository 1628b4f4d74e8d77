"""`python app.py [--host H] [--port P] [--auth user:pass] [--queue-size N]`: serve the page, on this machine only
by default.

Long work (generation, batches) waits in Gradio's queue, one run at a time, each waiting request seeing its place;
past `--queue-size` waiting requests the page answers that the queue is full, so a crowd cannot pile up unbounded
work and memory. Uploads over `studio.ui.uploads.MAX_UPLOAD_BYTES` are refused before they reach the disk.
"""

from __future__ import annotations

import argparse
from typing import Any

import gradio as gr

from studio.paths import library_dir
from studio.ui.display import CSS
from studio.ui.uploads import MAX_ADAPTER_BYTES, MAX_IMAGE_BYTES, MAX_UPLOAD_BYTES


QUEUE_SIZE = 64  # waiting requests, all tabs together


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="LoRA Studio web UI")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--auth", default=None, help="user:pass required to open the app")
    parser.add_argument("--queue-size", type=int, default=QUEUE_SIZE, metavar="N",
                        help=f"requests that may wait in the queue; past it the page says it is full ({QUEUE_SIZE})")
    parser.add_argument("--max-upload", type=float, default=MAX_UPLOAD_BYTES / 2**20, metavar="MB",
                        help="largest file the page accepts, in MB (the Train tab also holds each image to "
                             f"{MAX_IMAGE_BYTES // 2**20} MB, the Library tab each adapter to "
                             f"{MAX_ADAPTER_BYTES // 2**30} GB)")
    args = parser.parse_args(argv)
    if args.queue_size < 1:
        parser.error("--queue-size must be at least 1")
    if not 0 < args.max_upload < float("inf"):
        parser.error("--max-upload must be a positive number of MB")
    args.auth_pair = None
    if args.auth:
        user, sep, password = args.auth.partition(":")
        if not sep or not user or not password:
            parser.error("--auth must look like user:pass")
        args.auth_pair = (user, password)
    return args


def launch(
    demo: gr.Blocks,
    host: str = "127.0.0.1",
    port: int = 7860,
    auth: tuple[str, str] | None = None,
    queue_size: int = QUEUE_SIZE,
    **kwargs: Any,
) -> Any:
    """Queue and serve `demo` with the page's CSS; the library folder may be served (its previews), nothing else
    outside the temp dir."""
    library = library_dir()
    library.mkdir(parents=True, exist_ok=True)
    demo.queue(default_concurrency_limit=1, max_size=queue_size)
    return demo.launch(
        server_name=host,
        server_port=port,
        auth=auth,
        allowed_paths=[str(library.resolve())],
        show_error=True,
        css=CSS + kwargs.pop("css", ""),
        **{"max_file_size": MAX_UPLOAD_BYTES, **kwargs},
    )


def main(argv: list[str] | None = None) -> None:
    from studio.ui.app import build_app

    args = parse_args(argv)
    launch(build_app(), args.host, args.port, args.auth_pair, args.queue_size,
           max_file_size=int(args.max_upload * 2**20))
