"""The web UI in a real browser, beside the main flow (test_browser.py): login with a password, and the benchmarks
tab's report and queued run. Skipped like it when chromium or playwright is missing."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from browser_pages import TIMEOUT_MS, browser_api, check_inside, check_on_screen, displayed_pixels, shot
from PIL import Image


pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning")
expect = browser_api().expect


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


def test_benchmarks_tab_shows_the_latest_report_and_queues_a_quick_run(
    tmp_path: Path, page: Any, serve: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The latest report's figures and tables (a synthetic quick report, written by the report's own code), and a
    quick run that waits in the training queue behind a running job, cancelled while it waits."""
    from report_parts import write_report

    monkeypatch.setenv("STUDIO_BENCH_OUT", str(tmp_path))
    folder = tmp_path / "report-quick"
    report = write_report(folder)
    url, demo = serve()
    page.goto(url)
    page.locator("#tab-benchmarks-button").click()
    expect(page.locator("#bench-figures img")).to_have_count(len(report["figures"]))
    shown = displayed_pixels(page, "#bench-figures img")  # the first figure, as the page shows it
    expected = np.asarray(Image.open(folder / report["figures"][0]).convert("RGB"))
    assert shown.shape == expected.shape and np.abs(shown.astype(int) - expected.astype(int)).max() <= 2
    tables = page.locator("#bench-tables")
    expect(tables).to_contain_text("Benchmark report (QUICK)")
    expect(tables.locator("table").nth(0)).to_contain_text("sara")  # the headline: trainers, then composers
    expect(tables.locator("table").nth(1)).to_contain_text("lora_composer")
    shot(page, "9-benchmarks")

    # A training run holds the queue: the quick report waits behind it, and is cancelled before it starts.
    release = threading.Event()
    demo.jobs.submit("emblem-hold", 1, lambda job: (release.wait(TIMEOUT_MS / 1000), ("done", "held"))[1])
    page.locator("#bench-start").click()
    status = page.locator("#bench-status textarea")
    expect(status).to_have_value("queued: quick benchmark report waits for 1 job(s) ahead of it")
    assert [j.label for j in demo.jobs.unfinished()] == ["emblem-hold", "quick benchmark report"]
    shot(page, "9-benchmarks-queued")
    page.locator("#bench-cancel").click()
    expect(status).to_have_value("cancelled: cancelled before it started")
    release.set()
    page.set_viewport_size({"width": 390, "height": 844})
    check_on_screen(page, "bench-start")
    check_inside(page, "#bench-figures")
