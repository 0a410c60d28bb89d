"""Chats the browser keeps (Gradio's BrowserState), read back when the page loads or a past chat
is opened: checked like anything else a client sends, since the browser's storage is the client's.

The browser saves a chat when a question is sent (with its "waiting" note) and when its answer
ends. A chat read back with the waiting note still at its end lost its answer to a reload; the
note becomes a line saying so, with Retry. Files the server no longer has (uploads are deleted
after two hours) become a note in place of the picture, and a chat over the server's history
limits loses its oldest messages (as many as the limits take, counted after each saved message is
split into the Chatbot's messages), so what is shown can be sent again.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import gradio as gr

from ..intake.message import InputRules
from .chat_view import FOOT_METADATA, error_note, is_waiting_note

CUT_OFF = "the page was reloaded before this answer ended. Press Retry to ask again."
MISSING_FILE = "(a file no longer on the server)"
THOUGHT_KEYS = ("title", "status", "duration")
MAX_PARTS = 16  # of one saved message: the page's own hold a text and a few files


def restored_chat(saved: object, rules: InputRules) -> list[dict]:
    """The saved chat (a list of Chatbot messages) as the page may show and send it again."""
    if not isinstance(saved, list):
        return []
    messages = [message for entry in saved[-rules.max_history_messages:] for message in _message(entry, rules)]
    messages = _newest_within(messages[-rules.max_history_messages:], rules.max_history_chars)
    if messages and is_waiting_note(messages[-1]):
        messages[-1] = error_note(CUT_OFF)
    return messages


def _newest_within(messages: list[dict], max_chars: int) -> list[dict]:
    """The newest messages whose text stays within `max_chars` (one pass from the end)."""
    chars = 0
    for start in range(len(messages) - 1, -1, -1):
        content = messages[start]["content"]
        chars += len(content) if isinstance(content, str) else 0
        if chars > max_chars:
            return messages[start + 1:]
    return messages


def _message(entry: object, rules: InputRules) -> list[dict]:
    """One saved message as messages the Chatbot takes: text stays, files that are still on the
    server stay, anything else is dropped."""
    if not isinstance(entry, dict) or entry.get("role") not in ("user", "assistant"):
        return []
    shown = []
    for part in _parts(entry.get("content")):
        if isinstance(part, str):
            shown.append({"role": entry["role"], "content": part})
        elif entry["role"] == "user":
            path = _kept_file(part, rules)
            shown.append({"role": "user", "content": {"path": path}} if path else
                         {"role": "user", "content": MISSING_FILE, "metadata": dict(FOOT_METADATA)})
    metadata = entry.get("metadata")
    if isinstance(metadata, dict) and metadata and shown:
        kept = {key: metadata[key] for key in THOUGHT_KEYS if isinstance(metadata.get(key), (str, int, float))}
        for message in shown:
            message.setdefault("metadata", kept or dict(FOOT_METADATA))
    return shown


def _parts(content: object) -> list:
    """The parts of a message's content: strings for text, dicts for files."""
    if isinstance(content, str):
        return [content]
    parts = content if isinstance(content, list) else [content]
    found = []
    for part in parts[:MAX_PARTS]:
        if isinstance(part, str):
            found.append(part)
        elif isinstance(part, dict) and isinstance(part.get("text"), str):
            found.append(part["text"])
        elif isinstance(part, dict):
            found.append(part.get("file") if isinstance(part.get("file"), dict) else part)
    return found


def _kept_file(part: dict, rules: InputRules) -> str | None:
    """The file's path when it is an upload (or an example) still on the server."""
    path = part.get("path")
    if not isinstance(path, str) or not path:
        return None
    try:
        real = os.path.realpath(path)
    except (ValueError, OSError):  # a NUL in the path, a loop of links
        return None
    inside = any(real.startswith(os.path.realpath(root) + os.sep) for root in rules.allowed_roots)
    return path if inside and os.path.isfile(real) else None


def restored_settings(values: object, controls: Sequence[gr.components.Component]) -> list:
    """Saved setting values for `controls` (in the same order), each checked against its
    control: out-of-range numbers are clamped, anything unreadable keeps the control's value."""
    values = values if isinstance(values, list) and len(values) == len(controls) else [None] * len(controls)
    return [_setting(value, control) for value, control in zip(values, controls)]


def _setting(value: object, control: gr.components.Component):
    if isinstance(control, gr.Checkbox):
        return value if isinstance(value, bool) else gr.skip()
    if isinstance(control, gr.Slider):
        if not isinstance(value, (int, float)) or isinstance(value, bool) or value != value:
            return gr.skip()
        return min(max(value, control.minimum), control.maximum)
    if isinstance(control, gr.Textbox):
        return value[:control.max_length or 10_000] if isinstance(value, str) else gr.skip()
    return gr.skip()
