"""How a chat looks in the page's Chatbot: a question's bubbles, a reply's reasoning and answer,
and the line under a finished reply (its actions and stats).

No Gradio events here, only the messages they show: `page_events` wires them. Every message
this module adds besides the user's own and the answer carries `metadata`, which makes it
display-only: it is never sent back to the model (reasoning, the foot line, notes).

The Chatbot groups a turn's consecutive messages into one bubble, so a reply (reasoning,
answer, foot line) is one bubble with one row of actions: the row in its foot line, drawn
only once the reply has ended (a reply still streaming cannot be rated, retried or copied).
"""

from __future__ import annotations

import html
import re
import time
from dataclasses import dataclass

from ..config.settings import Settings
from ..intake.message import InputError, content_parts, file_path
from ..engine import ReplyStats
from ..engine.request import FinishReason
from ..engine.reasoning import split_reasoning

# `metadata` without a title: display-only for the model, and drawn by the Chatbot as a plain
# message instead of a collapsible block with a chevron.
FOOT_METADATA = {"status": "done"}
# The actions under the last reply (retry, edit and undo act on the last question only; the
# page's CSS hides them under earlier replies). The page script wires each class to its event.
LAST_ONLY_ACTIONS = (("retry", "Retry"), ("edit", "Edit question"), ("undo", "Undo"))
RATING_ACTIONS = (("like", "Like"), ("dislike", "Dislike"))
REPLY_ID = re.compile(r"data-reply='([0-9a-f]{8,64})'")


def user_bubbles(message) -> list[dict]:
    """How a sent message appears in the chat: its files, then its text (one bubble: the
    Chatbot groups them, and the page's CSS shows the pictures as a row of thumbnails)."""
    message = message if isinstance(message, dict) else {"text": str(message or ""), "files": []}
    shown = [{"role": "user", "content": {"path": file_path(f)}} for f in message.get("files") or []]
    if (message.get("text") or "").strip():
        shown.append({"role": "user", "content": message["text"]})
    return shown


def split_last_user_turn(history) -> tuple[list[dict], dict | None]:
    """Split the chat into (everything before the last question, that question as a message)."""
    history = [entry for entry in (history if isinstance(history, list) else [])
               if isinstance(entry, dict) and "role" in entry and "content" in entry]
    history = without_reply(history)
    start = len(history)
    while start and history[start - 1]["role"] == "user":
        start -= 1
    if start == len(history):
        return history, None
    text, files = [], []
    try:
        for entry in history[start:]:
            texts, paths = content_parts(entry["content"])
            text += texts
            files += paths
    except InputError:  # content the page never makes (a forged chat): no question to send again
        return history[:start], None
    return history[:start], {"text": "\n".join(text), "files": files}


def without_reply(history: list[dict]) -> list[dict]:
    """The chat less its trailing assistant messages: the reply about to be redrawn."""
    end = len(history)
    while end and history[end - 1]["role"] == "assistant":
        end -= 1
    return history[:end]


def note(text: str, kind: str) -> dict:
    """A line of its own under a question: waiting for a place, why there is no answer."""
    return {"role": "assistant", "content": f"<span class='{kind}'>{html.escape(text)}</span>",
            "metadata": dict(FOOT_METADATA)}


def waiting_note(ahead: int | None) -> dict:
    """Drawn with the question the moment it is sent, replaced by the answer when its turn
    comes. `ahead`: questions before it when the server is full; None when it starts at once.
    A chat saved in the browser while this note shows was cut off by a reload (`saved_chats.CUT_OFF`)."""
    if ahead is None:
        text = "answering…"
    else:
        text = "⏳ waiting for a free place: you are next" if ahead == 0 else f"⏳ waiting, {ahead} ahead"
    return note(text, "reply-waiting")


def is_waiting_note(entry: dict) -> bool:
    return entry.get("role") == "assistant" and "reply-waiting" in str(entry.get("content"))


def error_note(reason: str) -> dict:
    """What the chat shows when there is no answer (the engine failed, the page reloaded)."""
    return foot(f"⚠ No answer: {reason}", reply_id=None, kind="reply-error")


def foot(text: str, reply_id: str | None, kind: str = "reply-stats") -> dict:
    """The line under a finished reply: its row of actions, then `text` (stats or a reason).

    `reply_id` names the reply a rating refers to (the server keeps what it answered under it);
    a reply without one (an error) offers no rating."""
    actions = list(LAST_ONLY_ACTIONS) + (list(RATING_ACTIONS) if reply_id else [])
    buttons = "".join(f"<button type='button' class='reply-action act-{name}' title='{label}'>"
                      f"<span class='sr-only'>{label}</span></button>" for name, label in [("copy", "Copy"), *actions])
    marker = f" data-reply='{reply_id}'" if reply_id else ""
    return {"role": "assistant", "metadata": dict(FOOT_METADATA),
            "content": f"<div class='reply-foot'><span class='reply-actions'>{buttons}</span>"
                       f"<span class='{kind}'{marker}>{html.escape(text)}</span></div>"}


def stats_foot(stats_line: str, stats: ReplyStats | None, reply_id: str | None, *,
               thinking_only: bool = False) -> dict:
    """The foot line with the stats, marked when the reply was stopped or cut at the limit."""
    reason = stats.finish_reason if stats is not None else None
    if thinking_only:
        mark = "stopped while thinking (token limit)" if reason == FinishReason.LENGTH else \
            "■ stopped while thinking" if reason == FinishReason.CANCELLED else "no answer after thinking"
    elif reason == FinishReason.CANCELLED:
        mark = "■ stopped"
    elif reason == FinishReason.LENGTH:
        mark = "reached max new tokens"
    else:
        mark = ""
    return foot(" · ".join(part for part in (mark, stats_line) if part), reply_id)


def reply_id_of(values) -> str | None:
    """The reply id in a rated reply's messages (its foot line names it), if any."""
    for value in values if isinstance(values, (list, tuple)) else [values]:
        found = REPLY_ID.search(str(value))
        if found:
            return found.group(1)
    return None


@dataclass
class ReplyView:
    """One reply as chat messages while it streams: a collapsible "Thinking" block when the
    reply reasons (the prompt opened `<think>`, or the reply itself does), then the answer."""

    thinking: bool
    started: float = 0.0
    reasoning_seconds: float | None = None

    def __post_init__(self) -> None:
        self.started = self.started or time.monotonic()

    def messages(self, text: str, ended: bool = False) -> list[dict]:
        parts = split_reasoning(text, self.thinking)
        shown = []
        if parts.reasoning is not None:
            done = parts.reasoning_done or ended
            if done and self.reasoning_seconds is None:
                self.reasoning_seconds = round(time.monotonic() - self.started, 1)
            metadata = {"title": "Thinking", "status": "done" if done else "pending"}
            if self.reasoning_seconds is not None:
                metadata["duration"] = self.reasoning_seconds
            shown.append({"role": "assistant", "content": parts.reasoning or "…", "metadata": metadata})
        if parts.answer or parts.reasoning is None:
            shown.append({"role": "assistant", "content": parts.answer})
        return shown

    def answer(self, text: str) -> str:
        """The answer part of `text` (what is rated and logged): the reasoning left out."""
        return split_reasoning(text, self.thinking).answer

    def thinking_only(self, text: str) -> bool:
        """The reply ended inside its reasoning, with no answer at all."""
        parts = split_reasoning(text, self.thinking)
        return parts.reasoning is not None and not parts.answer.strip()


def input_placeholder(settings: Settings) -> str:
    """The box's own instruction, with the limits stated before anyone hits them."""
    return (f"Ask a question; attach up to {settings.max_images} images ({settings.max_file_mb:g} MB each) "
            f"or a video ({settings.max_video_mb:g} MB)")


def chat_howto(settings: Settings) -> str:
    """What the empty chat says: how to start, and what the page can do."""
    return (f"### Chat about pictures\n"
            f"Attach up to **{settings.max_images} images** ({settings.max_file_mb:g} MB each) **or a video** "
            f"({settings.max_video_mb:g} MB, {settings.max_video_seconds / 60:g} min), "
            f"ask a question, press **Enter**. Stop an answer with **■**; copy, retry, edit or rate "
            f"it with the row under it. Or start with an example:")
