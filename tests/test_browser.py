"""The page in a real headless Chromium: upload, ask, stream, memory line, stop, retry, clear.

Needs Debian's `chromium` (installed by .ci/run) and the `playwright` package; skipped with the
reason when either is missing.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import replace
from pathlib import Path

import pytest

from minicpmv_demo.server import build_app

CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
        "--disable-component-update", "--disable-sync"]
ASSETS = Path(__file__).resolve().parent.parent / "assets"

playwright_api = pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed")
if not (shutil.which(CHROMIUM) or os.path.exists(CHROMIUM)):
    pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install chromium)", allow_module_level=True)


@pytest.fixture(scope="module")
def url(tiny_settings, loaded_tiny):
    app = build_app(replace(tiny_settings, cache_size=0, max_new_tokens=1024), loaded_tiny)
    _, local_url, _ = app.launch(server_port=None, quiet=True)
    yield local_url
    app.close()


@pytest.fixture(scope="module")
def browser():
    with playwright_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield browser
        browser.close()


def open_page(browser, url, width=1280, height=900):
    page = browser.new_page(viewport={"width": width, "height": height})
    page.goto(url)
    page.locator("#chat-input textarea").wait_for()
    page.wait_for_timeout(800)  # the page opens its queue connection
    return page


def bot_messages(page):
    return page.locator("#chatbot .message-row.bot-row, #chatbot [data-testid='bot']")


def ask(page, text: str, image: str | None = None, max_tokens: int | None = None):
    if max_tokens is not None:
        page.get_by_text("Generation settings").click()
        box = page.get_by_label("Max new tokens", exact=False).first
        box.fill(str(max_tokens))
        box.press("Enter")
        page.get_by_text("Generation settings").click()
    if image:
        page.locator("#chat-input input[type=file]").set_input_files(str(ASSETS / image))
        page.locator("#chat-input img, #chat-input .thumbnail-item").first.wait_for()
    page.locator("#chat-input textarea").fill(text)
    page.locator("#chat-input textarea").press("Enter")


def test_ask_stream_memory_line_retry_clear(browser, url):
    page = open_page(browser, url)
    ask(page, "What does this chart show?", "chart.png", max_tokens=60)
    chatbot = page.locator("#chatbot")
    chatbot.get_by_text("What does this chart show?").wait_for()
    line = chatbot.get_by_text("No GPU: running on CPU")
    line.first.wait_for(timeout=60_000)
    assert "tok/s" in line.first.inner_text() and "batch" in line.first.inner_text()
    first_answer = chatbot.inner_text()
    page.locator("#retry-btn").click()
    page.wait_for_timeout(300)
    line.first.wait_for(timeout=60_000)
    assert chatbot.get_by_text("What does this chart show?").count() == 1, "retry replaces, it does not add"
    assert chatbot.inner_text() != "" and first_answer
    page.locator("#clear-btn").click()
    page.wait_for_function("!document.querySelector('#chatbot').innerText.includes('chart show')")
    page.close()


def test_stop_during_a_long_answer(browser, url):
    page = open_page(browser, url)
    ask(page, "Tell me a very long story about this scene.", "scene.png", max_tokens=1024)
    chatbot = page.locator("#chatbot")
    page.wait_for_function("document.querySelector('#chatbot').innerText.split(' ').length > 40",
                           timeout=60_000)
    page.locator("#stop-btn").click()
    page.wait_for_timeout(1500)
    frozen = chatbot.inner_text()
    page.wait_for_timeout(1500)
    assert chatbot.inner_text() == frozen, "the answer stopped growing"
    assert len(frozen.split()) < 1000
    page.close()


def test_narrow_mobile_viewport(browser, url):
    page = open_page(browser, url, width=390, height=844)
    ask(page, "What is on the receipt?", "receipt.png", max_tokens=20)
    page.locator("#chatbot").get_by_text("No GPU: running on CPU").first.wait_for(timeout=60_000)
    width = page.evaluate("document.documentElement.scrollWidth")
    assert width <= 400, f"no horizontal scrolling on a phone (page is {width}px wide)"
    page.screenshot(path=str(Path(os.environ.get("TMPDIR", "/tmp")) / "minicpmv-mobile.png"))
    page.close()


def test_two_sessions_never_see_each_others_chat(browser, url):
    first, second = open_page(browser, url), open_page(browser, url)
    ask(first, "A private question about this receipt", "receipt.png", max_tokens=10)
    first.locator("#chatbot").get_by_text("No GPU: running on CPU").first.wait_for(timeout=60_000)
    second.wait_for_timeout(500)
    assert "private question" not in second.locator("#chatbot").inner_text()
    ask(second, "Another person asks this", None, max_tokens=10)
    second.locator("#chatbot").get_by_text("No GPU: running on CPU").first.wait_for(timeout=60_000)
    assert "Another person" not in first.locator("#chatbot").inner_text()
    first.close()
    second.close()
