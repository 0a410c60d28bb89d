"""How a chat looks in the page's Chatbot: the user's bubbles, a reply's reasoning, answer and
stats caption, and the replies being generated per browser session (so Stop can mark them).

No Gradio events here, only the messages they show: the page (ui.py) wires them. Every message
this module adds besides the user's own and the answer carries `metadata`, which makes it
display-only: chat_input never sends it back to the model (reasoning, stats, error notes).
"""

from __future__ import annotations

import html
import threading
import time

from ..intake.message import content_parts, file_path
from ..engine import ReplyStats, ReplyStream
from ..engine.request import FinishReason
from ..engine.reasoning import split_reasoning

# A caption has `metadata` without a title: display-only for the model, and shown by the
# Chatbot as a plain (styled) message instead of a collapsible block with a chevron.
CAPTION_METADATA = {"status": "done"}


def user_bubbles(message) -> list[dict]:
    """How a sent message appears in the chat: one bubble per file, then the text."""
    message = message if isinstance(message, dict) else {"text": str(message or ""), "files": []}
    shown = [{"role": "user", "content": {"path": file_path(f)}} for f in message.get("files") or []]
    if (message.get("text") or "").strip():
        shown.append({"role": "user", "content": message["text"]})
    return shown


def split_last_user_turn(history) -> tuple[list[dict], dict | None]:
    """Split the chat into (everything before the last question, that question as a message)."""
    history = list(history or [])
    end = len(history)
    while end and history[end - 1]["role"] != "user":
        end -= 1
    start = end
    while start and history[start - 1]["role"] == "user":
        start -= 1
    if start == end:
        return history, None
    text, files = [], []
    for entry in history[start:end]:
        texts, paths = content_parts(entry["content"])
        text += texts
        files += paths
    return history[:start], {"text": "\n".join(text), "files": files}


def caption(text: str, kind: str = "reply-stats") -> dict:
    """A small line under a reply (its stats, or why there is no answer); never copied with the
    answer, because it is a message of its own (the Chatbot does not group messages)."""
    return {"role": "assistant", "content": f"<span class='{kind}'>{html.escape(text)}</span>",
            "metadata": dict(CAPTION_METADATA)}


def error_note(reason: str) -> dict:
    """What the chat shows when the engine could not answer (out of memory, model failure)."""
    return caption(f"⚠ No answer: {reason}", kind="reply-error")


def stats_caption(stats_line: str, stats: ReplyStats | None, stopped: bool = False) -> dict:
    """The stats caption, marked when the reply was stopped or cut at the token limit."""
    if stopped or (stats is not None and stats.finish_reason == FinishReason.CANCELLED):
        mark = "■ stopped"
    elif stats is not None and stats.finish_reason == FinishReason.LENGTH:
        mark = "reached max new tokens"
    else:
        mark = ""
    return caption(" · ".join(part for part in (mark, stats_line) if part))


class ReplyView:
    """One reply as chat messages while it streams: a collapsible "Thinking" block when the
    reply reasons (the prompt opened `<think>`, or the reply itself does), then the answer."""

    def __init__(self, thinking: bool) -> None:
        self.thinking = thinking
        self.started = time.monotonic()
        self.reasoning_seconds: float | None = None

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


def without_reply(history: list[dict]) -> list[dict]:
    """The chat less its trailing assistant messages: the reply about to be redrawn."""
    end = len(history)
    while end and history[end - 1]["role"] == "assistant":
        end -= 1
    return history[:end]


class LiveReplies:
    """The reply each browser session is generating, so its Stop can cancel it and redraw it
    from the engine's text (which may be a few tokens ahead of the page) with a stopped mark."""

    # A Stop this recent with no reply yet to stop was meant for the one about to start.
    EARLY_STOP_S = 3.0

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._replies: dict[str, tuple[ReplyStream, ReplyView, list[dict]]] = {}
        self._early_stops: dict[str, float] = {}

    def stopped_early(self, session: str) -> bool:
        """Whether Stop was pressed before this session's reply started (it raced the queue:
        the page's cancel can arrive before the reply's event exists to be cancelled)."""
        with self._lock:
            pressed = self._early_stops.pop(session, None)
        return pressed is not None and time.monotonic() - pressed < self.EARLY_STOP_S

    def start(self, session: str, stream: ReplyStream, view: ReplyView, shown: list[dict]) -> None:
        """`shown`: the chat with the question, as the reply's first update drew it."""
        with self._lock:
            self._replies[session] = (stream, view, shown)
            self._early_stops.pop(session, None)

    def end(self, session: str, stream: ReplyStream) -> None:
        """Forget `stream` if it is still this session's live reply (a newer one stays)."""
        with self._lock:
            if self._replies.get(session, (None,))[0] is stream:
                del self._replies[session]

    def stop(self, session: str, wait_s: float = 2.0,
             early: bool = True) -> tuple[ReplyStream, ReplyView, list[dict]] | None:
        """Cancel the session's reply and wait (briefly) for the engine to hand its stats.

        `early`: with no reply yet, remember the Stop for the one about to start (the Stop
        button); Undo and Clear cancel only what runs, and must not refuse the next question.
        """
        with self._lock:
            live = self._replies.pop(session, None)
            if live is None and early:
                now = time.monotonic()
                for stale in [s for s, pressed in self._early_stops.items() if now - pressed >= self.EARLY_STOP_S]:
                    del self._early_stops[stale]
                self._early_stops[session] = now
        if live is None:
            return None
        stream = live[0]
        stream.cancel()
        stream.wait(wait_s)
        return live


def message_text(entry: dict) -> str:
    """The text of one chat message (files left out)."""
    texts, _ = content_parts(entry.get("content"))
    return "\n".join(t for t in texts if t)


def question_before(history: list[dict], index: int) -> tuple[str, list[str]]:
    """The user's text and file names of the turn that `history[index]` answers."""
    end = index
    while end > 0 and history[end - 1]["role"] != "user":
        end -= 1
    start = end
    while start > 0 and history[start - 1]["role"] == "user":
        start -= 1
    texts, names = [], []
    for entry in history[start:end]:
        found_texts, paths = content_parts(entry.get("content"))
        texts += [t for t in found_texts if t]
        names += [path.rsplit("/", 1)[-1] for path in paths]
    return "\n".join(texts), names
