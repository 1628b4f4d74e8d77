"""`python app.py`: builds the page, binds to loopback by default, parses --auth. The tabs are tested in tests/ui."""

from __future__ import annotations

import socket
import urllib.request

import pytest

import app


def test_app_serves_on_loopback_by_default() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    demo = app.build_app()
    app.launch(demo, port=port, prevent_thread_lock=True, quiet=True)
    try:
        assert demo.server_name == "127.0.0.1"
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=10) as response:
            assert response.status == 200 and b"LoRA Studio" in response.read()
    finally:
        demo.close()


def test_cli_defaults_to_loopback_and_parses_auth() -> None:
    assert app.parse_args([]).host == "127.0.0.1" and app.parse_args([]).port == 7860
    assert app.parse_args([]).auth_pair is None
    assert app.parse_args(["--auth", "ann:secret"]).auth_pair == ("ann", "secret")
    assert app.parse_args(["--auth", "ann:se:cret"]).auth_pair == ("ann", "se:cret")
    with pytest.raises(SystemExit):
        app.parse_args(["--auth", "no-colon"])
    assert app.parse_args([]).queue_size == 64 and app.parse_args([]).max_upload == 2048
    assert app.parse_args(["--queue-size", "5", "--max-upload", "0.5"]).queue_size == 5
    for bad in (["--queue-size", "0"], ["--max-upload", "0"], ["--max-upload", "inf"]):
        with pytest.raises(SystemExit):
            app.parse_args(bad)


def test_every_tab_is_in_the_page() -> None:
    demo = app.build_app()
    labels = {block.label for block in demo.blocks.values() if type(block).__name__ == "Tab"}
    assert {"Generate", "Train", "Library", "Batch"} <= labels
