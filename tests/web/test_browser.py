"""The page in a real headless Chromium, as a visitor meets it: the first screen at desktop and
phone sizes, failures that leave the chat working, Stop in the box, the actions under a reply,
feedback, videos, separate visitors, reasoning. (The second review's findings, one test each,
are in test_page_review.py.)

Needs Debian's `chromium` (installed by .ci/run) and the `playwright` package; skipped with the
reason when either is missing. One app for the whole run (see browser_fixtures): every test opens
its own tab.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import httpx
import pytest

from browser_page import (DESKTOP, PHONE, SEND, STOP, assert_no_error_state, ask, chromium_missing, contrast_on_white_js,
                          expect, feet, last_foot_text, open_page, reply_action, set_settings, wait_answered)
from conftest import wait_until
from minicpmv_demo.web.style import FAVICON

pytestmark = pytest.mark.skipif(chromium_missing, reason="no Chromium (apt-get install chromium)")


def in_view(page, locator) -> bool:
    box = locator.bounding_box()
    height = page.viewport_size["height"]
    return box is not None and box["y"] >= 0 and box["y"] + box["height"] <= height


@pytest.mark.parametrize("size", [DESKTOP, PHONE], ids=["desktop", "phone"])
def test_first_screen_invites(browser, url, size, tiny_dir):
    page = open_page(browser, url, size)
    assert in_view(page, page.locator("#chat-input")), f"the input is above the fold at {size}"
    examples = page.locator("#chatbot .example")
    assert examples.count() == 4 and in_view(page, examples.first), "examples inside the empty chat, visible"
    assert "Chat about pictures" in page.locator("#chatbot").inner_text(), "a how-to in the empty chat"
    placeholder = page.locator("#chat-input textarea").get_attribute("placeholder")
    assert "up to 4 images (20 MB each)" in placeholder, "limits stated before they are hit"
    assert "Demo model: answers are random words" in page.inner_text("body")
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
    ratios = page.evaluate("() => {" + contrast_on_white_js() + """
        const color = (sel, pseudo) => getComputedStyle(document.querySelector(sel), pseudo).color;
        return {placeholder: ratio(color('#chat-input textarea', '::placeholder')),
                summary: ratio(color('#settings-summary p')),
                footer: ratio(color('footer a'))};
    }""")
    assert all(value >= 4.5 for value in ratios.values()), ratios
    page.close()


def test_an_empty_message_is_a_notice_and_the_chat_goes_on(browser, url):
    page = open_page(browser, url)
    set_settings(page, 8)
    page.locator("#chat-input textarea").press("Enter")
    expect(page.locator(".toast-body").get_by_text("Please type a question")).to_be_visible()
    assert_no_error_state(page)
    expect(page.locator("#chatbot .user-row")).to_have_count(0)
    ask(page, "Is the chat still working?")
    wait_answered(page, 1)
    page.close()


def test_engine_failure_is_a_note_in_the_chat(browser, url):
    """A question longer than the model's context fails in the engine: the chat says why under
    the question, no overlay, and the next question is answered."""
    page = open_page(browser, url)
    set_settings(page, 8)
    page.locator("#chat-input textarea").fill("x " * 6000)
    page.locator("#chat-input textarea").press("Enter")
    note = page.locator("#chatbot .reply-error")
    expect(note).to_contain_text("No answer", timeout=60_000)
    expect(note).to_contain_text("too long")
    page.locator(SEND).wait_for(timeout=10_000)
    assert_no_error_state(page)
    ask(page, "A short one now?")
    wait_answered(page, 2)
    page.close()


def test_stop_is_in_the_box_and_marks_the_reply(browser, url):
    page = open_page(browser, url)
    set_settings(page, 1024, temperature=0)
    ask(page, "Tell me a very long story about this scene.", "scene.png")
    stop = page.locator(STOP)
    stop.wait_for(timeout=15_000)
    assert page.locator(SEND).count() == 0, "Stop takes Send's place"
    assert "Answering" in page.locator("#chat-input textarea").get_attribute("placeholder"), "Enter is paused, said"
    page.wait_for_function("document.querySelector('#chatbot .bot-row')?.innerText.split(' ').length > 40",
                           timeout=60_000)
    stop.click()
    wait_answered(page, 1)
    foot = last_foot_text(page)
    assert "■ stopped" in foot and "tok/s" in foot, f"a stopped reply is marked and keeps its stats: {foot!r}"
    answer = page.locator("#chatbot .bot-row [data-testid='bot'] > .message-content").first
    frozen = answer.inner_text()
    ask(page, "A short one after it", max_tokens=6)
    wait_answered(page, 2)
    assert answer.inner_text() == frozen, "the stopped answer stayed as it was"
    assert "stopped" not in last_foot_text(page)
    assert_no_error_state(page)
    page.close()


def test_retry_edit_and_undo_under_the_last_reply(browser, url, held):
    page = open_page(browser, url)
    ask(page, "What does this chart show?", "chart.png", max_tokens=30)
    wait_answered(page, 1)
    held.go.clear()  # the new answer waits after its first word: the old one is seen to go first
    reply_action(page, "retry").click()
    expect(feet(page)).to_have_count(0)
    held.go.set()
    wait_answered(page, 1)
    chat = page.locator("#chatbot")
    assert chat.get_by_text("What does this chart show?").count() == 1, "retry replaces"
    reply_action(page, "edit").click()
    box = page.locator("#chat-input textarea")
    expect(box).to_have_value("What does this chart show?")
    expect(page.locator("#chat-input .thumbnail-item")).to_have_count(1)  # the question keeps its picture
    expect(chat.locator(".user-row")).to_have_count(0)
    box.fill("What is the best month?")
    box.press("Enter")
    wait_answered(page, 1)
    assert "What does this chart show?" not in chat.inner_text() and feet(page).count() == 1
    assert chat.locator("img").count() == 1, "the edited question keeps its picture"
    reply_action(page, "undo").click()
    expect(chat.locator(".user-row")).to_have_count(0)
    expect(box).to_have_value("")  # undo takes the question back, not into the box
    assert_no_error_state(page)
    page.close()


def test_copy_copies_the_answer_alone(browser, url):
    page = open_page(browser, url)
    page.context.grant_permissions(["clipboard-read", "clipboard-write"])
    set_settings(page, 20, temperature=0)
    ask(page, "Something to copy")
    wait_answered(page, 1)
    reply_action(page, "copy").click()
    expect(reply_action(page, "copy")).to_have_class(re.compile("done"))
    copied = page.evaluate("navigator.clipboard.readText()")
    answer = page.locator("#chatbot .bot-row [data-testid='bot'] > .message-content").first.inner_text().strip()
    assert copied == answer and "tok/s" not in copied, (copied, answer)
    page.close()


def test_feedback_logs_the_servers_own_reply(browser, page_app):
    page = open_page(browser, page_app.url)
    ask(page, "Rate this answer, please", max_tokens=12)
    wait_answered(page, 1)
    reply_action(page, "like").click()
    expect(page.locator(".toast-body").get_by_text("rating was saved")).to_be_visible()
    entries = [json.loads(line) for line in page_app.feedback_log.read_text().splitlines()]
    assert entries[-1]["rating"] == "like" and entries[-1]["question"] == "Rate this answer, please"
    assert entries[-1]["model"] == "tiny" and "tok/s" not in entries[-1]["answer"]
    reply_action(page, "dislike").click()  # a change of mind is logged too (a few times at most per reply)

    def ratings() -> list[str]:
        lines = [json.loads(line) for line in page_app.feedback_log.read_text().splitlines()]
        return [entry["rating"] for entry in lines if entry["question"] == "Rate this answer, please"]

    assert wait_until(lambda: ratings() == ["like", "dislike"], timeout=30), ratings()
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
    set_settings(page, 40, thinking=True)
    ask(page, "Think first, then answer.")
    page.locator("#chatbot .thought-group").get_by_text("Thinking").first.wait_for(timeout=60_000)
    wait_answered(page, 1)
    page.close()


def test_enter_while_answering_keeps_the_question_and_the_stop(browser, url, held):
    """Enter while Stop shows (empty, then with a question): the question stays in the box (the
    server refuses it with a notice where Gradio sends it at all), and the first answer keeps its
    Stop, its one writer and its end."""
    page = open_page(browser, url)
    set_settings(page, 12, temperature=0)
    held.go.clear()  # the answer holds after its first word
    ask(page, "The first question, still being answered.")
    stop = page.locator(STOP)
    expect(stop).to_be_visible()
    textarea = page.locator("#chat-input textarea")
    textarea.press("Enter")  # an empty Enter
    textarea.fill("A second question, sent too soon.")
    textarea.press("Enter")
    expect(stop).to_be_visible()
    held.go.set()
    wait_answered(page, 1)
    # Both presses were handled long before the held answer ended (`ask` runs outside the queue):
    # neither showed a question nor emptied the box.
    expect(page.locator("#chatbot .user-row")).to_have_count(1)
    expect(textarea).to_have_value("A second question, sent too soon.")
    assert "tok/s" in last_foot_text(page) and "stopped" not in last_foot_text(page)
    textarea.press("Enter")  # the kept question goes now
    wait_answered(page, 2)
    expect(page.locator("#chatbot")).to_contain_text("A second question, sent too soon.")
    assert "tok/s" in last_foot_text(page)
    page.close()
