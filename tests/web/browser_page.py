"""Driving the page in a real headless Chromium: opening it, asking, waiting for answers.

Every wait is a waiting assertion or `wait_for_function` on what the page shows, never a fixed
sleep followed by a check. Replies are held with `HeldRunner` where a test needs one in progress.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from browser_fixtures import CHROMIUM

ASSETS = Path(__file__).resolve().parents[2] / "assets"
DESKTOP, PHONE = (1366, 900), (390, 844)
# Gradio's error states: the red overlay of a failed event and an error toast.
ERROR_STATES = "[data-testid='status-tracker'] .error, .toast-body.error"
SEND = "#chat-input button[aria-label='Submit']"
STOP = "#chat-input button[aria-label='Stop']"

playwright_api = pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed")
expect = playwright_api.expect
chromium_missing = not (shutil.which(CHROMIUM) or os.path.exists(CHROMIUM))


def open_page(browser, url: str, size=DESKTOP):
    """A new tab in a browser context of its own (its own saved chats), loaded and connected."""
    page = browser.new_page(viewport={"width": size[0], "height": size[1]})
    page.goto(url)
    wait_loaded(page)
    return page


def wait_loaded(page) -> None:
    """Until the page has connected and restored its saved chat (a page without the page script,
    such as an older version, is ready when its examples show)."""
    page.locator("#chat-input textarea").wait_for()
    page.wait_for_function("() => window.minicpmv ? window.minicpmv.ready === true"
                           " : !!document.querySelector('#chatbot .example')", timeout=30_000)


def set_settings(page, max_tokens: int | None = None, temperature: float | None = None,
                 thinking: bool | None = None) -> None:
    """Set sliders through their number boxes and the Thinking box; greedy (temperature 0) makes
    the tiny model's random-word replies run to the token limit, so a reply can be stopped."""
    page.get_by_text("Generation settings").click()
    settings = page.locator("#generation-settings")
    summary = page.locator("#settings-summary")
    if max_tokens is not None:
        fill_slider(settings.get_by_label("Max new tokens", exact=False).first, max_tokens, summary,
                    f"up to {max_tokens} new tokens")
    if temperature is not None:
        fill_slider(settings.get_by_label("Temperature", exact=False).first, temperature, summary,
                    "greedy" if not temperature else f"temperature {temperature:g}")
    if thinking is not None:
        settings.get_by_label("Thinking").set_checked(thinking)
        expect(summary).to_contain_text("thinking on" if thinking else "thinking off")
    page.get_by_text("Generation settings").click()


def fill_slider(box, value: float, summary, shown: str, tries: int = 5) -> None:
    """Type a slider's value into its number box until the summary line shows it. A slider the
    accordion has just opened can still be mounting, and its first value then replaces what was
    typed in its first milliseconds (no visitor types that fast); typing again is what a visitor
    would do."""
    for _ in range(tries - 1):
        box.fill(str(value))
        box.press("Enter")
        try:
            expect(summary).to_contain_text(shown, timeout=2_000)
            return
        except AssertionError:
            continue
    box.fill(str(value))
    box.press("Enter")
    expect(summary).to_contain_text(shown)


def attach(page, *files: str | Path) -> None:
    page.locator("#chat-input input[type=file]").set_input_files([str(ASSETS / f) for f in files])


def ask(page, text: str, *files: str | Path, max_tokens: int | None = None) -> None:
    if max_tokens is not None:
        set_settings(page, max_tokens)
    if files:
        attach(page, *files)
        expect(page.locator("#chat-input .thumbnail-item")).to_have_count(len(files))
    page.locator("#chat-input textarea").fill(text)
    page.locator("#chat-input textarea").press("Enter")


def feet(page):
    """The foot lines of finished replies (their actions and stats, or why there is no answer)."""
    return page.locator("#chatbot .reply-foot")


def wait_answered(page, count: int = 1, timeout: float = 60_000) -> None:
    """Until `count` replies have ended (each has its foot line) and the box offers Send again."""
    page.wait_for_function(f"document.querySelectorAll('#chatbot .reply-foot').length >= {count}",
                           timeout=timeout)
    page.locator(SEND).wait_for(timeout=30_000)


def last_foot_text(page) -> str:
    return feet(page).last.inner_text()


def assert_no_error_state(page) -> None:
    errors = page.locator(ERROR_STATES)
    assert errors.count() == 0, f"no error overlay or error toast: {errors.all_inner_texts()}"


def reply_action(page, name: str, reply: int = -1):
    """A button of the row under a reply (-1: the last reply): copy, retry, edit, undo, like, dislike."""
    rows = page.locator("#chatbot .reply-foot")
    row = rows.nth(reply) if reply >= 0 else rows.last
    return row.locator(f".act-{name}")


def contrast_on_white_js() -> str:
    """A JS function `ratio(color)`: WCAG contrast of a CSS colour on white."""
    return """const lum = c => { const [r, g, b] = c.match(/[\\d.]+/g).slice(0, 3).map(v => {
            v = v / 255; return v <= 0.03928 ? v / 12.92 : Math.pow((v + 0.055) / 1.055, 2.4); });
            return 0.2126 * r + 0.7152 * g + 0.0722 * b; };
        const ratio = c => 1.05 / (lum(c) + 0.05);"""
