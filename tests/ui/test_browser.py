"""The web UI in a real browser (Playwright driving Debian's chromium): generate, train, queue, library, errors, auth.

Skipped when /usr/bin/chromium is missing (`./dev test` installs it on Debian when it can). Screenshots of each
stage are saved under test-artifacts/.
"""

from __future__ import annotations

import json
import re
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image


CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
PROMPT = "a large red star on the left on a white background"
TIMEOUT_MS = 60_000
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning")

if not CHROMIUM.exists():
    pytest.skip(f"{CHROMIUM} is missing: apt-get install chromium (./dev test does, as root)", allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install -e '.[dev]')")
expect = sync_api.expect
expect.set_options(timeout=TIMEOUT_MS)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with sync_api.sync_playwright() as playwright:
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


def shot(page: Any, name: str, full_page: bool = True) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"ui-{name}.png"), full_page=full_page)


def fill(page: Any, elem_id: str, value: object) -> None:
    """Type into a Gradio textbox or number box (its first input or textarea)."""
    page.locator(f"#{elem_id}").locator("input, textarea").first.fill(str(value))


def displayed_pixels(page: Any, selector: str) -> np.ndarray:
    """The RGB pixels of a displayed <img>, read back from the page through a canvas."""
    image = page.locator(selector).first
    expect(image).to_be_visible()
    page.wait_for_function("img => img.complete && img.naturalWidth > 0", arg=image.element_handle())
    data = image.evaluate(
        """img => {
            const canvas = document.createElement('canvas');
            canvas.width = img.naturalWidth; canvas.height = img.naturalHeight;
            const ctx = canvas.getContext('2d');
            ctx.drawImage(img, 0, 0);
            return [canvas.width, canvas.height, Array.from(ctx.getImageData(0, 0, canvas.width, canvas.height).data)];
        }"""
    )
    width, height, rgba = data
    return np.array(rgba, dtype=np.uint8).reshape(height, width, 4)[..., :3]


def start_training(page: Any, name: str, emblem: int) -> None:
    fill(page, "trainconfig-world-emblem", emblem)
    fill(page, "trainconfig-name", name)
    page.locator("#train-start").click()


def test_generate_train_queue_library_and_errors_in_a_browser(tmp_path: Path, page: Any, serve: Any) -> None:
    """Everything on the embedded default: no model is named anywhere, in the page or on the command line."""
    from studio.cli import main as studio
    from studio.library import Library

    url, demo = serve()
    page.goto(url)

    # Generate: the displayed image is the PNG `studio generate` writes for the same prompt and seed.
    expect(page.locator("#gen-model textarea")).to_have_value("studio-tiny")
    fill(page, "gen-prompt", PROMPT)
    fill(page, "gen-seed", 3)
    fill(page, "gen-steps", 4)
    page.locator("#gen-button").click()
    shown = displayed_pixels(page, "#gen-gallery img")
    expect(page.locator("#gen-info textarea")).to_have_value(re.compile("Steps: 4, Sampler: .*, Seed: 3"))
    out = tmp_path / "cli.png"
    cli = ["generate", "--prompt", PROMPT, "--seed", "3", "--steps", "4", "--out", str(out)]
    assert studio(cli) == 0
    expected = np.asarray(Image.open(out).convert("RGB"))
    assert shown.shape == expected.shape
    assert np.abs(shown.astype(int) - expected.astype(int)).max() <= 2
    shot(page, "1-generate")

    # A dropped PNG's parameters are read back, and fill the form again.
    fill(page, "gen-seed", 9)
    page.get_by_text("Read the parameters of a PNG").click()
    page.locator("#png-drop input[type=file]").set_input_files(str(out))
    expect(page.locator("#png-info textarea")).to_have_value(re.compile(f"^{PROMPT}\nSteps: 4, .*Seed: 3"))
    page.get_by_role("button", name="Use these parameters").click()
    expect(page.locator("#gen-seed input")).to_have_value("3")

    # Train two adapters on Shapes World emblems; the second request waits in the queue.
    page.get_by_role("tab", name="Train").click()
    fill(page, "trainconfig-trigger", "sks")
    fill(page, "trainconfig-train-steps", 4)
    page.get_by_text("More settings").click()
    fill(page, "trainconfig-world-images", 3)
    fill(page, "trainconfig-sample-steps", 2)
    fill(page, "trainconfig-num-class-images", 2)  # prior preservation is on by default for an emblem
    start_training(page, "emblem-a", 3)
    expect(page.locator("#train-status textarea")).not_to_have_value("no training yet")
    start_training(page, "emblem-b", 5)
    status = page.locator("#train-status textarea")
    expect(status).to_have_value(re.compile("^queued: emblem-b"))
    shot(page, "2-queued")
    expect(status).to_have_value(re.compile("^done: emblem-b is in the library"))
    expect(page.locator("#train-previews img").first).to_be_visible()
    shot(page, "3-trained")
    assert [j.state for j in demo.jobs.jobs()] == ["done", "done"]

    # The library tab shows both, with their previews.
    page.get_by_role("tab", name="Library").click()
    expect(page.locator("#lib-table")).to_contain_text("emblem-a")
    expect(page.locator("#lib-table")).to_contain_text("emblem-b")
    expect(page.locator("#lib-gallery img")).to_have_count(2)
    shot(page, "4-library")

    # Compose the two: LoRA Switch over both adapters; the image's parameters name them and the composer.
    page.get_by_role("tab", name="Compose").click()
    fill(page, "compose-prompt", f"{PROMPT} <lora:emblem-b:0.7>")
    fill(page, "compose-adapters", "emblem-a:0.8")
    fill(page, "compose-steps", 4)
    page.locator("#compose-composer").get_by_label("switch").check()
    page.locator("#compose-button").click()
    expect(page.locator("#compose-gallery img")).to_have_count(1)
    info = page.locator("#compose-info textarea")
    expect(info).to_have_value(re.compile("emblem-a"))
    expect(info).to_have_value(re.compile("emblem-b"))
    shot(page, "4b-compose")
    page.get_by_role("tab", name="Library").click()

    # Picking a preview selects its adapter; deleting asks first.
    page.locator("#lib-gallery img").first.click()
    expect(page.locator("#lib-selected input")).to_have_value("emblem-a")
    page.locator("#lib-delete").click()
    expect(page.get_by_text("Delete emblem-a for good?")).to_be_visible()
    shot(page, "5-delete-confirm")
    page.locator("#lib-delete-confirm").click()
    expect(page.locator("#lib-message textarea")).to_have_value("deleted emblem-a")
    expect(page.locator("#lib-table")).not_to_contain_text("emblem-a")
    assert Library().search(name="emblem") == [Library().get("emblem-b")]

    # Batch: a JSONL job file in, its images and one zip out.
    page.get_by_role("tab", name="Batch").click()
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text(
        "\n".join(json.dumps({"prompt": PROMPT, "steps": 1, "seed": s}) for s in (1, 2))
    )
    page.locator("#batch-file input[type=file]").set_input_files(str(jobs))
    page.locator("#batch-start").click()
    expect(page.locator("#batch-summary textarea")).to_have_value("2 of 2 jobs made 2 PNG files")
    expect(page.locator("#batch-gallery img")).to_have_count(2)
    expect(page.locator('#batch-zip a[href$="/batch.zip"]')).to_be_visible()
    shot(page, "6-batch")

    # A run that fails in the queue (the name is taken) says why, in its status and as a pop-up.
    page.get_by_role("tab", name="Train").click()
    page.locator("#train-start").click()  # the form still names emblem-b
    expect(status).to_have_value(re.compile("^failed: an adapter named 'emblem-b' already exists"))
    expect(page.locator(".toast-body", has_text="already exists; pick another --name")).to_be_visible()

    # A non-image upload is refused with its error shown in the page.
    page.get_by_label("Upload images").check()
    fake = tmp_path / "photo.png"
    fake.write_text("this is not a picture")
    page.locator("#train-uploads input[type=file]").set_input_files(str(fake))
    fill(page, "trainconfig-name", "from-upload")
    page.locator("#train-start").click()
    expect(page.locator(".toast-body.error", has_text="photo.png is damaged or not an image")).to_be_visible()
    page.wait_for_timeout(500)  # the toast's fade-in
    shot(page, "7-upload-error", full_page=False)  # toasts are fixed to the viewport


def test_with_auth_a_wrong_password_is_refused_in_a_browser(page: Any, serve: Any) -> None:
    url, _ = serve(auth=("ann", "secret"))
    page.goto(url)
    page.get_by_label("username").fill("ann")
    page.get_by_label("password").fill("wrong")
    page.get_by_role("button", name="Login").click()
    expect(page.get_by_text("Incorrect Credentials")).to_be_visible()
    shot(page, "8-auth-refused")
    assert page.locator("#gen-button").count() == 0
    page.get_by_label("username").fill("ann")
    page.get_by_label("password").fill("secret")
    page.get_by_role("button", name="Login").click()
    expect(page.locator("#gen-button")).to_be_visible()
