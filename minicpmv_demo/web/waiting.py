"""The line a visitor's question stands in, counted where it really is.

A question can wait in three places: Gradio's queue (every slot of the chat group is taken:
`--concurrency`), the API's own gate (OpenAI routes), and the engine's queue (every batch row
is taken). The engine sees only the last, so a side panel that showed only the engine's count
said "queue 0" while a visitor's question sat in Gradio's queue. This adds the three up.
"""

from __future__ import annotations

import gradio as gr

from .chat_service import ChatService


class WaitingLine:
    """How many questions wait for the model, and whether a new one would wait."""

    def __init__(self, service: ChatService, group: str) -> None:
        self.service = service
        self.group = group  # the concurrency group of every page event that reaches the engine
        self.demo: gr.Blocks | None = None

    def bind(self, demo: gr.Blocks) -> None:
        """The page whose queue to read (its queue exists once the Blocks are built)."""
        self.demo = demo

    def _page_queue(self) -> tuple[int, bool]:
        """(events waiting in Gradio's queue for the chat group, whether its slots are all taken).

        Gradio has no public reading of its queue; its internals are read defensively, so an
        upgrade that moves them makes this count 0 rather than fail."""
        queue = getattr(self.demo, "_queue", None)
        groups = getattr(queue, "event_queue_per_concurrency_id", None) or {}
        line = groups.get(self.group)
        if line is None:
            return 0, False
        limit = getattr(line, "concurrency_limit", None)
        full = limit is not None and getattr(line, "current_concurrency", 0) >= limit
        return len(getattr(line, "queue", ())), full

    def count(self) -> int:
        """Questions waiting for the model anywhere: Gradio's queue, the API's gate, the engine's."""
        waiting, _ = self._page_queue()
        return waiting + self.service.gate.waiting + self.service.engine.state().queue_depth

    def ahead(self) -> int | None:
        """How many wait before a question sent now; None when it would start at once."""
        waiting, page_full = self._page_queue()
        state = self.service.engine.state()
        engine_full = state.queue_depth > 0 or state.batch_size >= state.batch_ceiling
        if not (page_full or engine_full or waiting):
            return None
        return waiting + self.service.gate.waiting + state.queue_depth
