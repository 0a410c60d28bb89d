"""What Gradio keeps for each browser session, bounded.

Gradio keeps a state per session (up to `state_session_capacity` of them, least recently used
forgotten first), and in it, by default, a copy of the last value every component sent or was
sent, so that a "deep link" can rebuild the page later. An event that carries a large value (a
long chat, a forged history) left that copy behind for good: 40 such events kept 1.5 GB. This
page offers no deep links, so its sessions keep no such copies (nor the copy of the whole page
config each session started with): component updates stay (the page's own), event values go
with the event. With `--page-sessions` as the
capacity, what sessions hold is bounded by the page's own state, not by what clients send.

Gradio has no public switch for this; the two classes below adjust its session store, and `tests/web/test_page_sessions.py` fails if an upgrade changes what they rely on.
"""

from __future__ import annotations

from typing import Any

import gradio as gr
from fastapi import FastAPI
from gradio.state_holder import SessionState, StateHolder


class LeanSessionState(SessionState):
    """A session's state without the copies kept for deep links only: the page's whole config
    (about 100 KB, per session) and each event's values."""

    def __init__(self, blocks: gr.Blocks) -> None:
        super().__init__(blocks)
        self.config_values = {}  # filled again only by component updates, one small entry each

    def _update_value_in_config(self, key: int, value: Any) -> None:
        return None


class LeanStateHolder(StateHolder):
    """Gradio's session store, creating `LeanSessionState`s."""

    def __getitem__(self, session_id: str) -> SessionState:
        if session_id not in self.session_data:
            self.session_data[session_id] = LeanSessionState(self.blocks)
        return super().__getitem__(session_id)


def keep_sessions_lean(app: FastAPI, demo: gr.Blocks) -> None:
    """Give a launched app the lean session store (its capacity: `demo.state_session_capacity`).
    Call right after `launch`, before any session exists."""
    holder = LeanStateHolder()
    holder.set_blocks(demo)
    app.state_holder = holder
