"""Reading the page back in the browser tests: displayed pixels, a chart's axes, keyboard focus, layout at a width.

Each helper returns what the page shows (not what the server meant to send), so the checks built on them fail when
the page gets it wrong.
"""

from __future__ import annotations

import base64
import io
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image


ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"
TIMEOUT_MS = 60_000
CHROMIUM = Path("/usr/bin/chromium")
# each tab's main button: it must be reachable with the keyboard and on screen at a phone's width
MAIN_BUTTONS = {
    "Generate": "gen-button",
    "Train": "train-start",
    "Library": "lib-refresh",
    "Compose": "compose-button",
    "Batch": "batch-start",
}
# what Tab reaches on each tab, in this order (the main button among the controls around it)
KEYBOARD_PATHS = {
    "Generate": ["gen-random-seed", "gen-button", "gen-to-compose", "gen-to-train", "gen-history"],
    "Train": ["train-start", "train-cancel", "train-resume", "train-log-scale"],
    "Library": ["lib-refresh", "lib-filter-method", "lib-filter-kind", "lib-filter-base", "lib-sort",
                "lib-fits-model"],
    "Compose": ["compose-button", "compose-sweep"],
    "Batch": ["batch-start"],
}


def browser_api() -> Any:
    """playwright's sync API with its waits at TIMEOUT_MS, or a skip (of the calling test module when called at its
    top) when Debian's chromium or playwright is missing."""
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is missing: apt-get install chromium (./dev test does, as root)",
                    allow_module_level=True)
    api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install -e '.[dev]')")
    api.expect.set_options(timeout=TIMEOUT_MS)
    return api


def shot(page: Any, name: str, full_page: bool = True) -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / f"ui-{name}.png"
    page.screenshot(path=str(path), full_page=full_page)
    return path


def fill(page: Any, elem_id: str, value: object) -> None:
    """Type into a Gradio textbox or number box (its first input or textarea)."""
    page.locator(f"#{elem_id}").locator("input, textarea").first.fill(str(value))


def displayed_pixels(page: Any, selector: str) -> np.ndarray:
    """The RGB pixels of a displayed <img> at its natural size, read back from the page through a canvas (as a PNG
    data URL: lossless, and far quicker to pass than the pixel array)."""
    image = page.locator(selector).first
    image.wait_for(state="visible")
    page.wait_for_function("img => img.complete && img.naturalWidth > 0", arg=image.element_handle())
    url = image.evaluate(
        """img => {
            const canvas = document.createElement('canvas');
            canvas.width = img.naturalWidth; canvas.height = img.naturalHeight;
            canvas.getContext('2d').drawImage(img, 0, 0);
            return canvas.toDataURL('image/png');
        }"""
    )
    data = base64.b64decode(url.split(",", 1)[1])
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def _number(text: str) -> float:
    return float(text.replace("\u2212", "-").replace(",", ""))  # d3 writes minus signs as U+2212


def chart_axes(page: Any, selector: str) -> dict[str, dict[str, Any]]:
    """The axes a Vega chart draws: {"x"|"y": {"label": its aria-label, "ticks": [(value, screen x, screen y)]}}.

    A tick label that is not a number makes the check fail (a categorical axis of numbers still parses, but its
    aria-label says "discrete" and its ticks are evenly spaced in label order, not by value).
    """
    raw = page.locator(selector).evaluate(
        """el => Array.from(el.querySelectorAll('g.role-axis[aria-roledescription="axis"]')).map(g => [
            g.getAttribute('aria-label'),
            Array.from(g.querySelectorAll('.role-axis-label text')).map(t => t.textContent),
            Array.from(g.querySelectorAll('.role-axis-tick line')).map(t => {
                const r = t.getBoundingClientRect();
                return [r.x + r.width / 2, r.y + r.height / 2];
            }),
        ])"""
    )
    axes = {}
    for label, texts, marks in raw:
        assert len(texts) == len(marks), f"{label}: {len(texts)} labels for {len(marks)} ticks"
        axes["x" if label.startswith("X") else "y"] = {
            "label": label,
            "ticks": [(_number(text), x, y) for text, (x, y) in zip(texts, marks)],  # label value, tick position
        }
    return axes


def check_numeric_axes(axes: dict[str, dict[str, Any]]) -> None:
    """Both axes linear, with values growing rightwards (x) and upwards (y) in proportion to their positions."""
    for name, position in (("x", 1), ("y", 2)):
        axis = axes[name]
        assert "linear scale" in axis["label"], axis["label"]
        ticks = sorted(axis["ticks"], key=lambda t: t[position])  # by screen position: left to right, top to bottom
        values = [t[0] for t in ticks]
        assert len(values) >= 2, axis
        if name == "y":
            values = values[::-1]  # a loss axis reads upwards
        assert values == sorted(values) and len(set(values)) == len(values), f"{name} axis not in value order: {ticks}"
        first, last = ticks[0], ticks[-1]
        for value, *xy in ticks:  # positions proportional to values
            share = (value - first[0]) / (last[0] - first[0])
            expected = first[position] + share * (last[position] - first[position])
            assert abs(xy[position - 1] - expected) < 2, f"{name} tick {value} is off a number axis: {ticks}"


def screen_x(axis: dict[str, Any], value: float) -> float:
    """Where `value` lies on a linear x axis, from its first and last ticks."""
    (v0, x0, _), (v1, x1, _) = min(axis["ticks"]), max(axis["ticks"])
    return x0 + (value - v0) * (x1 - x0) / (v1 - v0)


def line_boxes(page: Any, selector: str, series: str) -> list[dict[str, Any]]:
    """Bounding boxes and stroke colours of the chart's lines of one series (Vega names it in each line's label)."""
    return page.locator(selector).evaluate(
        """(el, series) => Array.from(el.querySelectorAll('.mark-line path'))
            .filter(p => (p.getAttribute('aria-label') || '').split('; ').includes('series: ' + series))
            .map(p => {
                const r = p.getBoundingClientRect();
                return {x: r.x, y: r.y, width: r.width, height: r.height, stroke: getComputedStyle(p).stroke};
            })""",
        series,
    )


def focused_id(page: Any) -> str:
    """The id of the focused element, or of its nearest ancestor with one (Gradio puts ids on the component)."""
    return page.evaluate("() => { const o = document.activeElement?.closest('[id]'); return o ? o.id : ''; }")


def tab_until(page: Any, elem_id: str, limit: int) -> int:
    """Press Tab until the focus is inside `#elem_id`; returns the presses it took (fails after `limit`)."""
    for presses in range(1, limit + 1):
        page.keyboard.press("Tab")
        if focused_id(page) == elem_id:
            return presses
    raise AssertionError(f"#{elem_id} was not reached with {limit} Tab presses (last focus: #{focused_id(page)})")


def open_tab(page: Any, name: str) -> None:
    """Select tab `name`, through the "More tabs" menu where a narrow page moved it there."""
    tab = page.locator(f"#tab-{name.lower()}-button")
    if tab.count() and tab.is_visible():
        tab.click()
    else:
        page.get_by_role("button", name="More tabs").click()
        page.locator(".overflow-dropdown button", has_text=re.compile(f"^{name}$")).click()
    page.locator(f"#tab-{name.lower()}").wait_for(state="visible")


def check_on_screen(page: Any, elem_id: str) -> None:
    """`#elem_id` lies within the viewport's width once scrolled to, and the page does not scroll sideways."""
    button = page.locator(f"#{elem_id}")
    button.scroll_into_view_if_needed()
    box = button.bounding_box()
    width = page.viewport_size["width"]
    assert box is not None and box["width"] > 0, f"#{elem_id} is not displayed"
    assert box["x"] >= 0 and box["x"] + box["width"] <= width + 0.5, f"#{elem_id} is off-screen at {width} px: {box}"
    scroll = page.evaluate("() => [document.documentElement.scrollWidth, document.documentElement.clientWidth]")
    assert scroll[0] <= scroll[1], f"the page scrolls sideways at {width} px: {scroll}"


def captions_below(page: Any, selector: str) -> list[str]:
    """The captions of a gallery's images, checked to be shown in full (not cut, not scrolled out of the gallery's
    view) and under their image."""
    found = page.locator(selector).evaluate(
        """el => Array.from(el.querySelectorAll('.thumbnail-item')).map(item => {
            const img = item.querySelector('img').getBoundingClientRect();
            const view = item.closest('.grid-wrap').getBoundingClientRect();
            const label = item.querySelector('.caption-label');
            if (!label) return [null, 0, 0, 0, 0, 0];
            const box = label.getBoundingClientRect();
            return [label.textContent.trim(), label.scrollWidth - label.clientWidth, box.top - img.bottom,
                    box.height, getComputedStyle(label).opacity, view.bottom - box.bottom];
        })"""
    )
    for text, overflow, gap, height, opacity, room in found:
        assert text, f"an image of {selector} has no caption"
        assert overflow <= 1 and height > 0 and float(opacity) == 1, f"{text!r} is cut or hidden in {selector}"
        assert gap >= -1, f"{text!r} covers its image in {selector} ({gap:.1f} px)"
        assert room >= -1, f"{text!r} lies below the visible part of {selector} ({-room:.0f} px)"
    return [text for text, *_ in found]


def legend_entries(page: Any, selector: str) -> list[str]:
    """The legend labels of a chart that lie inside its component's box (a clipped legend explains nothing)."""
    return page.locator(selector).evaluate(
        """el => {
            const outer = el.getBoundingClientRect();
            return Array.from(el.querySelectorAll('.role-legend-label text'))
                .filter(t => { const r = t.getBoundingClientRect();
                               return r.height > 0 && r.top >= outer.top && r.bottom <= outer.bottom; })
                .map(t => t.textContent);
        }"""
    )


def check_inside(page: Any, selector: str) -> None:
    """Every image of a gallery lies within the gallery's width (none cut off at the side)."""
    outside = page.locator(selector).evaluate(
        """el => { const view = el.querySelector('.grid-wrap').getBoundingClientRect();
                   return Array.from(el.querySelectorAll('.thumbnail-item')).map(t => t.getBoundingClientRect())
                       .filter(r => r.left < view.left - 1 || r.right > view.right + 1).length; }"""
    )
    assert outside == 0, f"{outside} image(s) of {selector} are cut off at the side"


def close_toasts(page: Any) -> None:
    """Close every pop-up. Each close renumbers the rest and a toast may time out by itself, so this always closes
    the first one left, briefly, and checks none remain at the end."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout  # here, so a missing playwright still skips

    toasts = page.locator(".toast-close")
    for _ in range(20):
        if not toasts.count():
            break
        try:
            toasts.first.click(timeout=2_000)
        except PlaywrightTimeout:  # it went away on its own between the count and the click
            pass
    page.locator(".toast-body").first.wait_for(state="detached")
