"""The page's events: which handler runs when, in or outside the queue, and what the browser does
by itself (the `js=` steps call the page script, `page.js`).

- Sending, retrying or taking more tokens: the browser gives the question a new id, `ask` shows
  it at once (outside the queue), `answer` streams its reply when its turn comes (in the queue,
  the model's concurrency group), then the box offers Send again. The chat is saved in the
  browser after each step.
- Stop names the question id; it is not Gradio's `cancels=`, so it cannot race the reply.
- The row under a reply: the page script presses hidden buttons (retry, edit, undo) or
  Gradio's own like and dislike; copy happens in the browser.
- The browser keeps the chats and settings (BrowserState): restored on load, listed as past
  chats, with New chat to start another.
"""

from __future__ import annotations

from dataclasses import dataclass

import gradio as gr

from ..system.monitor import ServerMonitor
from .chat_handlers import ChatHandlers
from .chat_service import ChatService
from .saved_chats import restored_chat, restored_settings
from .server_panel import panel_html, plots
from .waiting import WaitingLine

NEW_QUESTION_ID = "(...args) => window.minicpmv.withNewId(...args)"
FOCUS_BOX = "() => window.minicpmv.focusBox()"
# Instant page-only events: outside the queue, and never a progress overlay over the box.
QUICK = {"queue": False, "api_visibility": "private", "show_progress": "hidden"}
# Page events that may show a notice: Gradio sends notices only to queued events. A group of
# their own without a limit, so they never wait behind the model's events.
NOTICE = {"queue": True, "concurrency_id": "page", "concurrency_limit": None, "api_visibility": "private",
          "show_progress": "hidden"}


@dataclass
class PageParts:
    """The components the events connect (built by `page.build_ui`)."""

    chatbot: gr.Chatbot
    chat_input: gr.MultimodalTextbox
    new_chat: gr.Button
    past_chats: gr.Dropdown
    summary: gr.Markdown
    controls: dict[str, gr.components.Component]  # the settings, by name, in the order `answer` takes
    defaults: list  # their values at start, in that order
    reset: gr.Button
    server_panel: gr.HTML
    plots: list[gr.LinePlot]
    question_id: gr.Textbox
    notice_text: gr.Textbox
    saved: gr.BrowserState
    retry: gr.Button
    edit: gr.Button
    undo: gr.Button
    notice: gr.Button

    @property
    def settings(self) -> list[gr.components.Component]:
        return list(self.controls.values())


def wire_page(demo: gr.Blocks, page: PageParts, handlers: ChatHandlers, service: ChatService, monitor: ServerMonitor,
              waiting: WaitingLine, model_event: dict) -> None:
    """Connect every event of the page (call inside the Blocks being built)."""
    _wire_questions(page, handlers, model_event)
    _wire_reply_actions(page, handlers)
    _wire_saved_chats(demo, page, service)
    _wire_settings(page)
    page.chat_input.upload(handlers.check_files, page.chat_input, page.chat_input, **NOTICE)
    page.notice.click(handlers.warn, page.notice_text, None, js="() => [window.minicpmv.takeNotice()]", **NOTICE)
    page.chatbot.example_select(example_message, None, page.chat_input, **QUICK).then(None, js=FOCUS_BOX)
    timer = gr.Timer(service.settings.panel_interval)
    timer.tick(lambda: panel_html(service.gpu, service.engine, waiting.count()), None, page.server_panel,
               **QUICK)
    timer.tick(lambda: plots(monitor), None, page.plots, **QUICK)


def _wire_questions(page: PageParts, handlers: ChatHandlers, model_event: dict) -> None:
    """Send, Retry and "Retry with more tokens": ask (at once), then answer (in the queue)."""
    asked = [page.chatbot, page.chat_input, page.question_id]
    answer_inputs = [page.question_id, *page.settings]
    # "multiple": a question sent while the answer to a stopped one still waits for its turn gets its
    # own answer (Gradio would otherwise drop an event whose earlier run is pending).
    answer_event = {**model_event, "api_visibility": "private", "show_progress": "hidden", "trigger_mode": "multiple"}
    save = _save_chat(page)

    def then_answer(asking) -> None:
        asking.then(**save)
        answered = asking.then(handlers.answer, answer_inputs, [page.chatbot, page.chat_input], **answer_event)
        answered.then(**save)

    then_answer(page.chat_input.submit(handlers.ask, [page.chat_input, page.chatbot, page.question_id], asked,
                                       js=NEW_QUESTION_ID, **NOTICE))
    then_answer(page.retry.click(handlers.ask_again, [page.chatbot, page.question_id], asked,
                                 js=NEW_QUESTION_ID, **NOTICE))
    then_answer(page.chatbot.option_select(handlers.ask_with_more_tokens, [page.chatbot, page.question_id],
                                           [*asked, page.controls["max_new_tokens"]], js=NEW_QUESTION_ID,
                                           **NOTICE))
    page.chat_input.stop(handlers.stop, page.question_id, [page.chatbot, page.chat_input], **QUICK).then(**save)


def _wire_reply_actions(page: PageParts, handlers: ChatHandlers) -> None:
    """Edit and undo (the page script presses their hidden buttons); like and dislike."""
    save = _save_chat(page)
    page.edit.click(handlers.edit_question, page.chatbot, [page.chatbot, page.chat_input], **QUICK) \
        .then(**save).then(None, js=FOCUS_BOX)
    page.undo.click(handlers.undo, page.chatbot, page.chatbot, **QUICK).then(**save)
    page.chatbot.like(handlers.rate, None, None, **NOTICE)  # queued, so that the thank-you toast shows


def _wire_saved_chats(demo: gr.Blocks, page: PageParts, service: ChatService) -> None:
    """Restore the current chat and the settings on load; past chats; New chat."""
    rules, settings = service.rules, page.settings

    def restore(saved: dict | None):
        """The browser's current chat and settings, checked (see `saved_chats`)."""
        saved = saved if isinstance(saved, dict) else {}
        return restored_chat(saved.get("messages"), rules), *restored_settings(saved.get("settings"), settings)

    def open_chat(saved: dict | None, _chat_id: str):
        return restored_chat((saved or {}).get("messages") if isinstance(saved, dict) else None, rules)

    demo.load(restore, page.saved, [page.chatbot, *settings], js="(saved) => [window.minicpmv.current(saved)]",
              **QUICK).then(None, settings, page.summary, js="(...values) => window.minicpmv.loaded(values)")
    page.saved.change(chat_choices, page.saved, page.past_chats, js="(saved) => [window.minicpmv.titles(saved)]",
                      **QUICK)
    page.past_chats.input(open_chat, [page.saved, page.past_chats], page.chatbot,
                          js="(saved, id) => [window.minicpmv.chatFor(saved, id), id]", **QUICK) \
        .then(None, [page.saved, page.past_chats], page.saved, js="(saved, id) => window.minicpmv.select(saved, id)")
    page.new_chat.click(None, [page.saved, page.chatbot], [page.saved, page.chatbot],
                        js="(saved, chat) => window.minicpmv.newChat(saved, chat)") \
        .then(None, js=FOCUS_BOX)


def _wire_settings(page: PageParts) -> None:
    """The summary line follows the settings and the browser keeps them, both in the browser
    (see `settingsSummary` in page.js for why); Reset puts the defaults back."""
    gr.on([control.change for control in page.settings], None, [page.saved, *page.settings],
          [page.summary, page.saved], js="(saved, ...values) => window.minicpmv.settingsChanged(saved, values)")
    page.reset.click(lambda: page.defaults, None, page.settings, **QUICK)


def _save_chat(page: PageParts) -> dict:
    """A browser-only step that saves the chat shown into the browser's saved chats."""
    return {"fn": None, "inputs": [page.saved, page.chatbot], "outputs": page.saved,
            "js": "(saved, chat) => window.minicpmv.saveChat(saved, chat)"}


def chat_choices(titles: dict | None) -> dict:
    """The past-chats list: (title, id) of each chat the browser keeps, the current one chosen."""
    titles = titles if isinstance(titles, dict) else {}
    chats = titles.get("chats") if isinstance(titles.get("chats"), list) else []
    choices = [(str(item[0])[:80], item[1]) for item in chats[:50]
               if isinstance(item, (list, tuple)) and len(item) == 2 and isinstance(item[1], str)]
    current = titles.get("current")
    chosen = current if isinstance(current, str) and current in {c[1] for c in choices} else None
    return gr.update(choices=choices, value=chosen)


def example_message(selected: gr.SelectData) -> dict:
    """An example clicked in the empty chat fills the box; the visitor presses Enter."""
    value = selected.value if isinstance(selected.value, dict) else {}
    files = value.get("files") if isinstance(value.get("files"), list) else []
    paths = [f.get("path") if isinstance(f, dict) else f for f in files]
    text = value.get("text")
    return {"text": text if isinstance(text, str) else "", "files": [p for p in paths if isinstance(p, str)]}
