"""UI tests train and generate on tiny models: one torch thread, so a busy 2-core machine does not thrash.

The browser tests' fixtures: Debian's chromium driven by playwright, offline, and the app served on 127.0.0.1."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from browser_pages import CHROMIUM, TIMEOUT_MS, browser_api


torch.set_num_threads(1)
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with browser_api().sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
        yield browser
        browser.close()


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    context.set_default_timeout(TIMEOUT_MS)
    # offline: anything but the app itself (web fonts, CDNs) is refused at once
    context.route("**/*", lambda route: route.continue_() if "//127.0.0.1" in route.request.url else route.abort())
    page = context.new_page()
    yield page
    context.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def serve() -> Iterator[Any]:
    """serve(auth=None) -> (url, demo): the app on 127.0.0.1 and a free port, closed after the test."""
    from studio.ui import build_app, launch

    demos = []

    def start(auth: tuple[str, str] | None = None) -> tuple[str, Any]:
        demo = build_app()
        port = _free_port()
        launch(demo, "127.0.0.1", port, auth, prevent_thread_lock=True, quiet=True)
        demos.append(demo)
        return f"http://127.0.0.1:{port}/", demo

    yield start
    for demo in demos:
        demo.close()
