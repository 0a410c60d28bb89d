"""The page in a real headless Chromium, as a visitor meets it: the first screen at desktop and
phone sizes, refusals that leave the chat working, Stop in the box, per-message actions, feedback.

Needs Debian's `chromium` (installed by .ci/run) and the `playwright` package; skipped with the
reason when either is missing. One app for the whole module: every test opens its own tab.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import replace
from pathlib import Path

import httpx
import pytest

from conftest import HeldRunner
from minicpmv_demo.web.server import build_app
from minicpmv_demo.web.style import FAVICON

CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
        "--disable-component-update", "--disable-sync"]
ASSETS = Path(__file__).resolve().parents[2] / "assets"
DESKTOP, PHONE = (1366, 900), (390, 844)
# Gradio's error states: the red overlay of a failed event and an error toast.
ERROR_STATES = "[data-testid='status-tracker'] .error, .toast-body.error"

playwright_api = pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed")
expect = playwright_api.expect
if not (shutil.which(CHROMIUM) or os.path.exists(CHROMIUM)):
    pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install chromium)", allow_module_level=True)


@pytest.fixture(scope="module")
def served(tiny_settings, loaded_tiny, tmp_path_factory):
    feedback_log = tmp_path_factory.mktemp("feedback") / "feedback.jsonl"
    held = replace(loaded_tiny, runner=HeldRunner(loaded_tiny.runner))
    app = build_app(replace(tiny_settings, cache_size=0, max_new_tokens=1024, feedback_log=str(feedback_log)),
                    held)
    _, local_url, _ = app.launch(server_port=None, quiet=True)
    yield local_url, feedback_log, held.runner
    app.close()


@pytest.fixture(scope="module")
def url(served):
    return served[0]


@pytest.fixture
def held(served):
    """The model's runner: clear its `go` to hold a reply after its first token (HeldRunner)."""
    runner = served[2]
    yield runner
    runner.go.set()


@pytest.fixture(scope="module")
def browser():
    with playwright_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield browser
        browser.close()


def open_page(browser, url, size=DESKTOP):
    page = browser.new_page(viewport={"width": size[0], "height": size[1]})
    page.goto(url)
    page.locator("#chat-input textarea").wait_for()
    expect(page.locator("#chatbot .example").first).to_be_visible()  # the page has loaded its app
    return page


def set_max_tokens(page, max_tokens: int, temperature: float | None = None) -> None:
    """Set the sliders through their number boxes; greedy (temperature 0) makes the tiny model's
    random-word replies run to the token limit, so a test can stop one mid-way."""
    page.get_by_text("Generation settings").click()
    for label, value in (("Max new tokens", max_tokens), ("Temperature", temperature)):
        if value is not None:
            box = page.locator("#generation-settings").get_by_label(label, exact=False).first
            box.fill(str(value))
            box.press("Enter")
    page.get_by_text("Generation settings").click()


def ask(page, text: str, *files: str | Path, max_tokens: int | None = None) -> None:
    if max_tokens is not None:
        set_max_tokens(page, max_tokens)
    if files:
        page.locator("#chat-input input[type=file]").set_input_files([str(ASSETS / f) for f in files])
        page.locator("#chat-input .thumbnail-item").nth(len(files) - 1).wait_for()
    page.locator("#chat-input textarea").fill(text)
    page.locator("#chat-input textarea").press("Enter")


def captions(page):
    return page.locator("#chatbot .reply-stats")


def wait_answered(page, count: int = 1, timeout: float = 60_000) -> None:
    """Until `count` replies carry their stats caption and the box offers Send again."""
    page.wait_for_function(f"document.querySelectorAll('#chatbot .reply-stats').length >= {count}",
                           timeout=timeout)
    page.locator("#chat-input button[aria-label='Submit']").wait_for(timeout=10_000)


def assert_no_error_state(page) -> None:
    errors = page.locator(ERROR_STATES)
    assert errors.count() == 0, f"no error overlay or error toast: {errors.all_inner_texts()}"


def remove_files(page) -> None:
    while page.locator("#chat-input button[aria-label='Remove file']").count():
        page.locator("#chat-input button[aria-label='Remove file']").first.click()


def click_while_shown(button, tries: int = 3) -> bool:
    """Click a button the page may redraw meanwhile (a streamed update re-renders the box)."""
    for _ in range(tries):
        try:
            button.click(timeout=3_000)
            return True
        except playwright_api.TimeoutError:
            if not button.count():
                return False
    return False


def in_view(page, locator) -> bool:
    box = locator.bounding_box()
    height = page.viewport_size["height"]
    return box is not None and box["y"] >= 0 and box["y"] + box["height"] <= height


@pytest.mark.parametrize("size", [DESKTOP, PHONE], ids=["desktop", "phone"])
def test_first_screen_invites(browser, url, size, tiny_dir):
    page = open_page(browser, url, size)
    box = page.locator("#chat-input")
    assert in_view(page, box), f"the input is above the fold at {size}"
    examples = page.locator("#chatbot .example")
    assert examples.count() == 4 and in_view(page, examples.first), "examples inside the empty chat, visible"
    assert "Chat about pictures" in page.locator("#chatbot").inner_text(), "a how-to in the empty chat"
    placeholder = page.locator("#chat-input textarea").get_attribute("placeholder")
    assert "up to 4 images (20 MB each)" in placeholder, "limits stated before they are hit"
    assert "Demo model: answers are random words" in page.inner_text("body")
    expect(page.get_by_text("make run", exact=False).first).to_be_hidden()  # operator help is folded
    expect(page.get_by_text("thinking off").first).to_be_visible()  # a one-line summary of the settings
    assert tiny_dir not in page.content(), "no local folder path shown to visitors"
    assert page.locator("#chat-input").get_by_text("Your message").count() == 1, "the input has a meaningful label"
    assert page.evaluate("document.documentElement.scrollWidth") <= size[0], "no horizontal scrolling"
    page.screenshot(path=str(Path(os.environ.get("TMPDIR", "/tmp")) / f"minicpmv-first-{size[0]}.png"))
    page.close()


def test_page_identity_and_contrast(browser, url):
    page = open_page(browser, url)
    assert page.title() == "MiniCPM-V chat"
    assert httpx.get(f"{url}favicon.ico", timeout=10).content == FAVICON.read_bytes(), "our own favicon"
    ratios = page.evaluate("""() => {
        const lum = c => { const [r, g, b] = c.match(/[\\d.]+/g).slice(0, 3).map(v => {
            v = v / 255; return v <= 0.03928 ? v / 12.92 : Math.pow((v + 0.055) / 1.055, 2.4); });
            return 0.2126 * r + 0.7152 * g + 0.0722 * b; };
        const ratio = c => (1.05) / (lum(c) + 0.05);  // on white
        const color = (sel, pseudo) => getComputedStyle(document.querySelector(sel), pseudo).color;
        return {placeholder: ratio(color('#chat-input textarea', '::placeholder')),
                summary: ratio(color('#settings-summary p')),
                footer: ratio(color('footer a'))};
    }""")
    assert all(value >= 4.5 for value in ratios.values()), ratios
    page.close()


def test_refusals_are_toasts_and_the_chat_goes_on(browser, url, tmp_path):
    """Empty message, a text file named .png, 6 images: each a toast only, the box keeps what
    was typed, nothing enters the chat, and the next good question is answered."""
    fake = tmp_path / "fake.png"
    fake.write_text("this is not a picture")
    page = open_page(browser, url)
    set_max_tokens(page, 8)
    textarea = page.locator("#chat-input textarea")

    textarea.press("Enter")
    page.locator(".toast-body").get_by_text("Please type a question").wait_for(timeout=15_000)
    assert_no_error_state(page)
    ask(page, "Is the chat still working?")
    wait_answered(page, 1)

    page.locator("#chat-input input[type=file]").set_input_files(str(fake))
    page.locator("#chat-input .thumbnail-item").first.wait_for()
    textarea.fill("What is in this file?")
    textarea.press("Enter")
    page.locator(".toast-body").get_by_text("fake.png").first.wait_for(timeout=15_000)
    assert_no_error_state(page)
    assert textarea.input_value() == "What is in this file?", "the typed text stays to be fixed"
    assert page.locator("#chat-input .thumbnail-item").count() == 1, "so does the file"
    assert "What is in this file?" not in page.locator("#chatbot").inner_text(), "a refusal never enters the chat"
    remove_files(page)
    textarea.fill("And now without the file?")
    textarea.press("Enter")
    wait_answered(page, 2)

    ask(page, "Six at once?", *["chart.png", "receipt.png", "diagram.png", "scene.png", "chart.png", "receipt.png"])
    page.locator(".toast-body").get_by_text("Too many images").first.wait_for(timeout=15_000)
    assert_no_error_state(page)
    assert page.locator("#chat-input .thumbnail-item").count() == 6 and textarea.input_value() == "Six at once?"
    remove_files(page)
    textarea.fill("Last question, text only")
    textarea.press("Enter")
    wait_answered(page, 3)
    chat = page.locator("#chatbot")
    assert chat.locator("img").count() == 0, "no refused picture in the chat"
    for refused in ("What is in this file?", "Six at once?"):
        assert refused not in chat.inner_text()
    assert_no_error_state(page)
    page.close()


def test_engine_failure_is_a_note_in_the_chat(browser, url):
    """A question longer than the model's context fails in the engine: the chat says why under
    the question, no overlay, and the next question is answered."""
    page = open_page(browser, url)
    set_max_tokens(page, 8)
    page.locator("#chat-input textarea").fill("x " * 6000)
    page.locator("#chat-input textarea").press("Enter")
    note = page.locator("#chatbot .reply-error")
    note.wait_for(timeout=60_000)
    assert "No answer" in note.inner_text() and "too long" in note.inner_text()
    page.locator("#chat-input button[aria-label='Submit']").wait_for(timeout=10_000)
    assert_no_error_state(page)
    ask(page, "A short one now?")
    wait_answered(page, 1)
    page.close()


def test_stop_is_in_the_box_and_marks_the_reply(browser, url):
    page = open_page(browser, url)
    set_max_tokens(page, 1024, temperature=0)
    ask(page, "Tell me a very long story about this scene.", "scene.png")
    stop = page.locator("#chat-input button[aria-label='Stop']")
    stop.wait_for(timeout=15_000)
    assert page.locator("#chat-input button[aria-label='Submit']").count() == 0, "Stop takes Send's place"
    assert "Answering" in page.locator("#chat-input textarea").get_attribute("placeholder"), "Enter is paused, said"
    page.wait_for_function("document.querySelector('#chatbot .bot-row')?.innerText.split(' ').length > 40",
                           timeout=60_000)
    stop.click()
    mark = captions(page).get_by_text("stopped")
    mark.first.wait_for(timeout=10_000)
    assert "tok/s" in mark.first.inner_text(), "a stopped reply keeps its stats"
    frozen = page.locator("#chatbot").inner_text()
    page.locator("#chat-input button[aria-label='Submit']").wait_for(timeout=5_000)  # the reply's event ended
    assert page.locator("#chatbot").inner_text() == frozen, "the answer stopped growing"
    assert_no_error_state(page)
    page.close()


def test_twenty_quick_stops_never_error(browser, url):
    page = open_page(browser, url)
    set_max_tokens(page, 1024, temperature=0)
    textarea = page.locator("#chat-input textarea")
    stopped = 0
    for i in range(20):
        textarea.fill(f"Quick question {i}, please answer at length.")
        textarea.press("Enter")
        stop = page.locator("#chat-input button[aria-label='Stop']")
        stop.wait_for(timeout=15_000)
        page.wait_for_timeout(40 * (i % 10))  # 0 to 0.4 s after Stop appears: before or as the reply starts
        clicked = click_while_shown(stop)
        stopped += clicked
        try:
            page.locator("#chat-input button[aria-label='Submit']").wait_for(timeout=15_000)
        except playwright_api.TimeoutError:
            pytest.fail(f"still answering 15 s after Stop number {i} (clicked: {clicked})")
        assert_no_error_state(page)
    assert stopped >= 10, f"only {stopped} of 20 replies were still running when Stop was pressed"
    answered = captions(page).count()
    ask(page, "After all that, one more?", max_tokens=8)
    wait_answered(page, answered + 1)
    assert_no_error_state(page)
    page.close()


def test_retry_edit_and_trash(browser, url, held):
    page = open_page(browser, url)
    ask(page, "What does this chart show?", "chart.png", max_tokens=30)
    wait_answered(page, 1)
    held.go.clear()  # the new answer waits after its first word: the old one is seen to go first
    page.locator("#chatbot button[aria-label='Retry']").last.click()
    expect(captions(page)).to_have_count(0)
    held.go.set()
    wait_answered(page, 1)
    assert page.locator("#chatbot").get_by_text("What does this chart show?").count() == 1, "retry replaces"
    page.locator("#chatbot button[aria-label='Edit']").last.click()
    editor = page.locator("#chatbot textarea").first
    editor.fill("What is the best month?")
    page.locator("#chatbot button[aria-label='Submit']").first.click()
    page.locator("#chatbot").get_by_text("What is the best month?").wait_for(timeout=15_000)
    wait_answered(page, 1)
    chat = page.locator("#chatbot")
    assert "What does this chart show?" not in chat.inner_text() and captions(page).count() == 1
    assert chat.locator("img").count() == 1, "the edited question keeps its picture"

    set_max_tokens(page, 1024, temperature=0)
    held.go.clear()  # the answer holds after its first word: Clear comes while it is answering
    ask(page, "Tell me a very long story.")
    page.locator("#chat-input button[aria-label='Stop']").wait_for(timeout=15_000)
    expect(chat).to_contain_text("long story")
    page.locator("#chatbot button[aria-label='Clear']").click()
    expect(chat).not_to_contain_text("long story")
    held.go.set()
    page.locator("#chat-input button[aria-label='Submit']").wait_for(timeout=15_000)  # the reply's event ended
    assert "best month" not in chat.inner_text() and "long story" not in chat.inner_text(), \
        "the trash icon clears for good, even while answering"
    assert_no_error_state(page)
    page.close()


def test_feedback_is_written_to_the_log(browser, served):
    url, feedback_log, _ = served
    page = open_page(browser, url)
    ask(page, "Rate this answer, please", max_tokens=12)
    wait_answered(page, 1)
    page.locator("#chatbot button[aria-label='Like']").first.click()
    page.locator(".toast-body").get_by_text("rating was saved").wait_for(timeout=10_000)
    entries = [json.loads(line) for line in feedback_log.read_text().splitlines()]
    assert entries[-1]["rating"] == "like" and entries[-1]["question"] == "Rate this answer, please"
    assert entries[-1]["answer"] and entries[-1]["model"] == "tiny"
    page.close()


def test_a_video_is_answered_and_shown(browser, url, tmp_path):
    from clips import make_clip

    clip = make_clip(tmp_path / "clip.mp4", seconds=2)
    page = open_page(browser, url)
    page.locator("#generation-settings").get_by_text("Generation settings").click()
    expect(page.locator("#generation-settings").get_by_label("Max frames per video").first).to_be_visible()
    page.locator("#generation-settings").get_by_text("Generation settings").click()
    ask(page, "What happens in this clip?", Path(clip), max_tokens=8)
    wait_answered(page, 1)
    assert page.locator("#chatbot video").count() == 1, "the video is in the chat"
    assert_no_error_state(page)
    page.close()


def test_narrow_mobile_viewport(browser, url):
    page = open_page(browser, url, PHONE)
    ask(page, "What is on the receipt?", "receipt.png", max_tokens=20)
    wait_answered(page, 1)
    width = page.evaluate("document.documentElement.scrollWidth")
    assert width <= 400, f"no horizontal scrolling on a phone (page is {width}px wide)"
    page.close()


def test_two_sessions_never_see_each_others_chat(browser, url):
    first, second = open_page(browser, url), open_page(browser, url)
    ask(first, "A private question about this receipt", "receipt.png", max_tokens=10)
    wait_answered(first, 1)
    assert "private question" not in second.locator("#chatbot").inner_text()
    ask(second, "Another person asks this", max_tokens=10)
    wait_answered(second, 1)
    assert "Another person" not in first.locator("#chatbot").inner_text()
    first.close()
    second.close()


def test_thinking_toggle_shows_collapsible_reasoning(browser, url):
    """Needs the tiny model's thinking template (its prompt opens `<think>` when asked to)."""
    page = open_page(browser, url)
    page.get_by_text("Generation settings").click()
    page.locator("#generation-settings").get_by_label("Thinking").check()
    page.get_by_text("Generation settings").click()
    expect(page.get_by_text("thinking on").first).to_be_visible()
    ask(page, "Think first, then answer.", max_tokens=40)
    page.locator("#chatbot .thought-group").get_by_text("Thinking").first.wait_for(timeout=60_000)
    wait_answered(page, 1)
    page.close()
