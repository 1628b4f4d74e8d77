"""The web UI in a real browser (Playwright driving Debian's chromium): generate, train, queue, library, errors,
keyboard, and the page at a phone's width (login and the benchmarks tab: test_browser_tabs.py).

Skipped when /usr/bin/chromium is missing (`./dev test` installs it on Debian when it can). Screenshots of each
stage are saved under test-artifacts/ (desktop 1400 px wide, and `-390` ones at 390 px).
"""

from __future__ import annotations

import json
import re
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from browser_pages import (
    KEYBOARD_PATHS,
    MAIN_BUTTONS,
    TIMEOUT_MS,
    browser_api,
    captions_below,
    chart_axes,
    check_inside,
    check_numeric_axes,
    check_on_screen,
    close_toasts,
    displayed_pixels,
    fill,
    legend_entries,
    line_boxes,
    open_tab,
    screen_x,
    shot,
    tab_until,
)
from PIL import Image


PROMPT = "a large red star on the left on a white background"
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning")
expect = browser_api().expect


def start_training(page: Any, name: str, emblem: int) -> None:
    fill(page, "trainconfig-world-emblem", emblem)
    fill(page, "trainconfig-name", name)
    page.locator("#train-start").click()


@pytest.fixture
def hold_at_step_two(monkeypatch: pytest.MonkeyPatch) -> threading.Event:
    """Runs named emblem-a pause after their step 2 until the event is set: the page can be read mid-run (the
    estimate of the time left) and a second run is sure to be queued behind it."""
    from studio.ui.jobs import Job

    release, report = threading.Event(), Job.report_step

    def report_step(job: Job, step: int, loss: float) -> None:
        report(job, step, loss)
        if job.label.startswith("emblem-a") and step == 2:
            release.wait(TIMEOUT_MS / 1000)

    monkeypatch.setattr(Job, "report_step", report_step)
    return release


def check_generate(page: Any, tmp_path: Path) -> Path:
    """Generate: crisp enlarged images equal to the CLI's PNG, seeds under images, random seed, history, sends."""
    from studio.cli import main as studio
    from studio.ui.display import display_image

    expect(page.locator("#gen-model textarea")).to_have_value("studio-tiny")
    fill(page, "gen-prompt", PROMPT)
    fill(page, "gen-seed", 3)
    fill(page, "gen-steps", 4)
    page.locator("#gen-button").click()
    expect(page.locator("#gen-info textarea")).to_have_value(re.compile("Steps: 4, Sampler: .*, Seed: 3"))
    # the image shown is the CLI's PNG for the same prompt and seed, enlarged 4x with nearest-neighbour (4x4 blocks)
    # and kept crisp by the browser (image-rendering: pixelated); the PNG offered for download is the original
    shown = displayed_pixels(page, "#gen-gallery img")
    out = tmp_path / "cli.png"
    cli = ["generate", "--prompt", PROMPT, "--seed", "3", "--steps", "4", "--out", str(out)]
    assert studio(cli) == 0
    original = Image.open(out).convert("RGB")
    expected = np.asarray(display_image(original))
    assert shown.shape == expected.shape == (256, 256, 3)
    assert np.abs(shown.astype(int) - expected.astype(int)).max() <= 2
    rendering = page.locator("#gen-gallery img").first.evaluate("img => getComputedStyle(img).imageRendering")
    assert rendering == "pixelated"
    expect(page.locator('#gen-files a[href$="/image.png"]')).to_be_visible()
    expect(page.locator("#gen-gallery")).to_contain_text("seed 3")
    assert captions_below(page, "#gen-gallery") == ["seed 3"]  # each image's seed, under it
    shot(page, "1-generate")
    page.set_viewport_size({"width": 390, "height": 844})
    check_inside(page, "#gen-gallery")
    shot(page, "1-generate-390")
    page.set_viewport_size({"width": 1400, "height": 1000})

    # The random-seed button draws a new seed; the history keeps the image, and choosing it (with the keyboard)
    # restores every parameter it was made with.
    page.locator("#gen-random-seed").click()
    expect(page.locator("#gen-seed input")).not_to_have_value("3")
    assert re.fullmatch(r"\d+", page.locator("#gen-seed input").input_value())
    fill(page, "gen-prompt", "a small blue ring")
    fill(page, "gen-steps", 9)
    expect(page.locator("#gen-history img")).to_have_count(1)
    page.locator("#gen-history button.thumbnail-item").first.focus()
    page.keyboard.press("Enter")
    expect(page.locator("#gen-seed input")).to_have_value("3")
    expect(page.locator("#gen-prompt textarea")).to_have_value(PROMPT)
    expect(page.locator("#gen-steps input[type=number]")).to_have_value("4")
    expect(page.locator("#gen-history")).to_contain_text("seed 3")

    # A dropped PNG's parameters are read back, and fill the form again.
    fill(page, "gen-seed", 9)
    page.get_by_text("Read the parameters of a PNG").click()
    page.locator("#png-drop input[type=file]").set_input_files(str(out))
    expect(page.locator("#png-info textarea")).to_have_value(re.compile(f"^{PROMPT}\nSteps: 4, .*Seed: 3"))
    page.get_by_role("button", name="Use these parameters").click()
    expect(page.locator("#gen-seed input")).to_have_value("3")

    # Send the chosen image (seed 3) to Compose: its parameters fill the form and the tab opens.
    page.locator("#gen-to-compose").click()
    expect(page.locator("#tab-compose-button")).to_have_attribute("aria-selected", "true")
    expect(page.locator("#compose-prompt textarea")).to_have_value(PROMPT)
    expect(page.locator("#compose-seed input")).to_have_value("3")
    expect(page.locator("#compose-steps input[type=number]")).to_have_value("4")

    # Send it to Train as a training image: the data source switches to uploads and the PNG is among them.
    page.get_by_role("tab", name="Generate").click()
    page.locator("#gen-to-train").click()
    expect(page.locator("#tab-train-button")).to_have_attribute("aria-selected", "true")
    expect(page.get_by_label("Upload images")).to_be_checked()
    expect(page.locator('#train-uploads a[href*="/generated-seed3-"][href$=".png"]')).to_be_visible()
    page.get_by_label("Shapes World emblem").check()
    return out


def check_training(page: Any, demo: Any, release: threading.Event) -> None:
    """Train two adapters (the second queued); time left, numeric loss chart, labelled previews, side-by-side."""
    fill(page, "trainconfig-trigger", "sks")
    fill(page, "trainconfig-train-steps", 4)
    page.get_by_text("More settings").click()
    fill(page, "trainconfig-world-images", 3)
    fill(page, "trainconfig-sample-steps", 2)
    fill(page, "trainconfig-num-class-images", 2)  # prior preservation is on by default for an emblem
    start_training(page, "emblem-a", 3)
    status = page.locator("#train-status textarea")
    # held after step 2 (see hold_at_step_two): the status gives the time left from the pace of the steps
    expect(status).to_have_value(
        re.compile(r"^running: emblem-a .*step 2/4, loss [\d.]+, \d+:\d\d elapsed, about \d+:\d\d left$")
    )
    start_training(page, "emblem-b", 5)
    expect(status).to_have_value(re.compile("^queued: emblem-b"))
    shot(page, "2-queued")
    release.set()
    expect(status).to_have_value(re.compile("^done: emblem-b is in the library"))
    assert [j.state for j in demo.jobs.jobs()] == ["done", "done"]
    job = demo.jobs.jobs()[-1]

    # The loss chart: numeric step and loss axes (not categories), raw and smoothed lines, the checkpoint marked.
    chart = "#train-loss"
    expect(page.locator(f"{chart} .mark-line path")).to_have_count(3)
    axes = chart_axes(page, chart)
    check_numeric_axes(axes)
    losses = [v for _, v in job.losses]
    y_values = [v for v, _, _ in axes["y"]["ticks"]]
    assert min(y_values) <= max(losses) and max(y_values) >= min(losses)  # the ticks span the losses
    (checkpoint,) = line_boxes(page, chart, "last checkpoint")
    assert job.checkpoint_step == 4 and checkpoint["width"] < 3 and checkpoint["stroke"] == "rgb(214, 39, 40)"
    assert abs(checkpoint["x"] + checkpoint["width"] / 2 - screen_x(axes["x"], 4)) < 3
    assert legend_entries(page, chart) == ["raw", "smoothed", "last checkpoint"]

    # Each preview says its step and prompt; the side-by-side shows each sample prompt without and with the adapter.
    expect(page.locator("#train-previews")).to_contain_text("step 4 · a large sks emblem in the center")
    expect(page.locator("#train-previews img")).to_have_count(4)
    labels = captions_below(page, "#train-previews")
    assert labels == [f"step 4 · {image.info['prompt']}" for image in job.previews]  # in full, under each image
    assert displayed_pixels(page, "#train-previews img").shape == (256, 256, 3)
    expect(page.locator("#train-compare img")).to_have_count(8)
    pairs = captions_below(page, "#train-compare")
    assert pairs[:2] == [f"without · seed 0 · {job.previews[0].info['prompt']}",
                         f"with emblem-b · seed 0 · {job.previews[0].info['prompt']}"]  # fmt: skip
    shot(page, "3-trained")
    page.get_by_text("More settings").click()  # closed, as a new user finds it
    page.set_viewport_size({"width": 390, "height": 844})
    check_inside(page, "#train-previews")
    check_inside(page, "#train-compare")
    assert captions_below(page, "#train-compare")[:2] == pairs[:2]
    shot(page, "3-trained-390")
    page.set_viewport_size({"width": 1400, "height": 1000})

    # A log scale: the y axis turns into log10(loss), its ticks within the logs of the losses.
    page.locator("#train-log-scale input").check()
    expect(page.locator(f"{chart} [aria-roledescription=axis][aria-label*='log10(loss)']")).to_have_count(1)
    y_values = [v for v, _, _ in chart_axes(page, chart)["y"]["ticks"]]
    assert all(np.log10(min(losses)) - 0.3 <= v <= np.log10(max(losses)) + 0.3 for v in y_values), y_values
    page.locator("#train-log-scale input").uncheck()


def check_library(page: Any, tmp_path: Path) -> None:
    """Library: both adapters with previews, fit badges, filter and sort, the card as text."""
    from studio.library import export_adapter, import_adapter

    # an adapter that differs in method (imported, no base recorded) to sort and filter by
    import_adapter(export_adapter("emblem-a", "kohya", tmp_path / "a.safetensors"), name="aa-imported")
    page.get_by_role("tab", name="Library").click()
    table = page.locator("#lib-table")
    expect(table).to_contain_text("emblem-b")
    expect(page.locator("#lib-gallery img")).to_have_count(2)
    rows = table.locator("[role=row][data-index]")  # the grid's body rows
    expect(rows).to_have_count(3)
    expect(rows.first).to_contain_text("aa-imported")  # sorted by name
    for row in range(3):  # all three load on studio-tiny (the imported one by its tensors' shapes)
        expect(rows.nth(row)).to_contain_text("✓ fits")
    expect(page.locator("#lib-gallery")).to_contain_text("emblem-a ✓ fits")

    def choose(elem_id: str, option: str) -> None:
        page.locator(f"#{elem_id} input").click()
        page.get_by_role("option", name=option, exact=True).click()

    choose("lib-sort", "method")  # dreambooth_lora before imported
    expect(rows.last).to_contain_text("aa-imported")
    expect(rows.first).to_contain_text("emblem-a")
    choose("lib-filter-method", "imported")
    expect(rows).to_have_count(1)
    expect(rows.first).to_contain_text("aa-imported")
    choose("lib-filter-method", "all")
    choose("lib-filter-kind", "subject")  # the import's kind is unknown
    expect(rows).to_have_count(2)
    shot(page, "4-library")
    choose("lib-filter-kind", "all")
    choose("lib-filter-base", "sdxl")  # all three are for sd1
    expect(rows).to_have_count(0)
    choose("lib-filter-base", "all")
    expect(rows).to_have_count(3)


@pytest.mark.heavy
def test_generate_train_queue_library_and_errors_in_a_browser(
    tmp_path: Path, page: Any, serve: Any, hold_at_step_two: threading.Event, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Everything on the embedded default: no model is named anywhere, in the page or on the command line."""
    import studio.ui.library_tab as library_tab
    from studio.library import Library

    trains = library_tab.train_retriever_view  # the page's button, at 20 steps instead of 1000
    monkeypatch.setattr(library_tab, "train_retriever_view", lambda: trains(steps=20))

    url, demo = serve()
    page.goto(url)
    check_generate(page, tmp_path)
    check_training(page, demo, hold_at_step_two)
    check_library(page, tmp_path)

    # Compose the two: LoRA Switch over both adapters; the image's parameters name them and the composer.
    page.get_by_role("tab", name="Compose").click()
    fill(page, "compose-prompt", f"{PROMPT} <lora:emblem-b:0.7>")
    fill(page, "compose-adapters", "emblem-a:0.8")
    fill(page, "compose-steps", 4)
    page.locator("#compose-composer").get_by_label("switch").check()
    for option in ("#compose-tau", "#compose-order"):  # the form shows the chosen composer's options alone
        expect(page.locator(option)).to_be_visible()
    for option in ("#compose-boxes", "#compose-preview", "#compose-cache", "#compose-concept-masks"):
        expect(page.locator(option)).to_be_hidden()
    page.locator("#compose-button").click()
    expect(page.locator("#compose-gallery img")).to_have_count(1)
    info = page.locator("#compose-info textarea")
    expect(info).to_have_value(re.compile("emblem-a"))
    expect(info).to_have_value(re.compile("emblem-b"))
    shot(page, "4b-compose")

    # LoRA-Composer with no typed boxes: "on the left" places the emblem, and the layout is drawn before composing.
    fill(page, "compose-prompt", "a large sks emblem on the left and a small blue circle on the right")
    fill(page, "compose-adapters", "emblem-a")
    page.locator("#compose-composer").get_by_label("lora_composer").check()
    expect(page.locator("#compose-tau")).to_be_hidden()
    expect(page.locator("#compose-boxes")).to_be_visible()
    page.locator("#compose-preview").click()
    page.wait_for_function("() => document.querySelector('#compose-layout img')?.naturalWidth > 0")
    drawn = displayed_pixels(page, "#compose-layout img").astype(int)  # (256, 256, 3): the middle of the left half
    box = (drawn[..., 0] > 150) & (drawn[..., 1] < 100)  # the box's outline colour (the frame is grey)
    assert box[128, :3].any() and box[128, 126:131].any()  # its left and right edges
    assert not box[:60].any() and not box[:, 135:].any()  # nothing above y = 0.25 or in the right half
    shot(page, "4c-compose-layout")

    # Compose by prompt: AutoLoRA retrieves the adapters from the words (by their cards: no retriever is trained
    # here) and says which; the Library tab's search by description ranks the same way. emblem-a and its kohya
    # round trip aa-imported share the trigger sks, so either may come first, never emblem-b.
    fill(page, "compose-prompt", "a large sks emblem in the center on a white background")
    page.locator("#compose-by-prompt").click()
    retrieved = page.locator("#compose-retrieved textarea")
    expect(retrieved).to_have_value(re.compile(r"^1\. (emblem-a|aa-imported)  score"))
    expect(page.locator("#compose-info textarea")).to_have_value(re.compile("autolora"))
    page.get_by_role("tab", name="Library").click()
    fill(page, "lib-retrieve", "the sks emblem")
    page.locator("#lib-retrieve-button").click()
    expect(page.locator("#lib-retrieved tbody tr").first).to_contain_text(re.compile("emblem-a|aa-imported"))
    shot(page, "4d-library-search")
    page.locator("#lib-retrieve-train").click()  # then "weights only" reads the weights
    expect(page.locator("#lib-message textarea")).to_have_value(re.compile("^retriever trained on 3 adapters in "))
    page.locator("#lib-retrieve-weights-only").get_by_role("checkbox").check()
    page.locator("#lib-retrieve-button").click()
    weights = page.locator("#lib-retrieved tbody tr").first.locator("td").nth(3)  # rank, name, score, weights
    expect(weights).to_have_text(re.compile(r"^-?\d+\.\d+$"))

    # Picking a preview selects its adapter and shows its model card as text; deleting asks first.
    page.locator("#lib-gallery img").first.click()
    expect(page.locator("#lib-selected input")).to_have_value("emblem-a")
    card = page.locator("#lib-card")
    expect(card.locator("h1")).to_have_text("emblem-a")
    expect(card).to_contain_text("Trigger words: sks")
    expect(card).to_contain_text("a large sks emblem in the center on a white background")  # sample prompts
    expect(card).not_to_contain_text("base_model:")  # the YAML header is metadata, not text
    expect(page.locator("#lib-loss img")).to_be_visible()
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
    expect(page.locator("#batch-gallery")).to_contain_text(f"00001.png · job 1 · seed 2 · {PROMPT}")  # its caption
    expect(page.locator('#batch-zip a[href$="/batch.zip"]')).to_be_visible()
    shot(page, "6-batch")

    # A run that fails in the queue (the name is taken) says why, in its status and as a pop-up.
    page.get_by_role("tab", name="Train").click()
    status = page.locator("#train-status textarea")
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
    page.get_by_label("Shapes World emblem").check()
    close_toasts(page)  # the pop-ups, so that nothing covers the page below

    # Keyboard: from the top of the page, Tab reaches each tab, Enter opens it, and Tab reaches its main button and
    # the controls around it (the history's images were chosen with Enter above).
    for name, path in KEYBOARD_PATHS.items():
        page.locator("h1", has_text="LoRA Studio").click()  # Tab goes on from the top of the page
        tab_until(page, f"tab-{name.lower()}-button", limit=12)
        page.keyboard.press("Enter")
        expect(page.locator(f"#tab-{name.lower()}-button")).to_have_attribute("aria-selected", "true")
        for elem_id in path:
            tab_until(page, elem_id, limit=60)
            if elem_id == MAIN_BUTTONS[name]:
                assert page.evaluate("() => document.activeElement.tagName") == "BUTTON"

    # A phone's width (390 px): every tab's main button is on screen and nothing scrolls sideways.
    page.set_viewport_size({"width": 390, "height": 844})
    for name, button in MAIN_BUTTONS.items():
        open_tab(page, name)
        check_on_screen(page, button)
