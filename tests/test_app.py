"""The web UI is a view over the Python API: it builds, binds to loopback, and generates what the CLI generates."""

from __future__ import annotations

import urllib.request
from pathlib import Path

import numpy as np
import pytest

import app
from studio.generate import GenerateConfig, generate


class _NoProgress:
    def __call__(self, *args, **kwargs) -> None:
        pass


def test_generate_handler_matches_api(tiny_dirs: dict) -> None:
    names = ["model", "prompt", "negative", "seed", "steps", "guidance", "scheduler", "size", "num_images"]
    components = {name: object() for name in names}
    values = dict(zip(components.values(), [str(tiny_dirs["sd1"]), "a red star", "", 4, 2, 5.0, "ddim", "", 1]))
    images, info = app.run_generate(values, components, _NoProgress())
    expected = generate(GenerateConfig(prompt="a red star", model=str(tiny_dirs["sd1"]), seed=4, steps=2,
                                       guidance=5.0, scheduler="ddim")).images[0]
    assert np.array_equal(np.asarray(images[0]), np.asarray(expected))
    assert "Seed: 4" in info and "Sampler: DDIM" in info


def test_generate_handler_shows_studio_errors(tmp_path: Path) -> None:
    import gradio as gr

    names = ["model", "prompt", "negative", "seed", "steps", "guidance", "scheduler", "size", "num_images"]
    components = {name: object() for name in names}
    values = dict(zip(components.values(), [str(tmp_path / "missing"), "x", "", 0, 2, 5.0, "", "", 1]))
    with pytest.raises(gr.Error, match="does not exist"):
        app.run_generate(values, components, _NoProgress())


def test_app_serves_on_loopback_by_default() -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    demo = app.build_app()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=10) as response:
            assert response.status == 200 and b"LoRA Studio" in response.read()
    finally:
        demo.close()


def test_cli_defaults_to_loopback_and_parses_auth() -> None:
    assert app.parse_args([]).host == "127.0.0.1"
    assert app.parse_args(["--auth", "ann:secret"]).auth_pair == ("ann", "secret")
    with pytest.raises(SystemExit):
        app.parse_args(["--auth", "no-colon"])
