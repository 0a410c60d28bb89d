"""The questions the page is answering, by the id each question gets when it is sent, so that
Stop cancels exactly the answer it was pressed for.

The page creates the id in the browser when a question is sent (a retry or an edit is a new
question with a new id) and Stop names it. Stop never cancels Gradio's event: it cancels that
question's engine stream, and the answer's own generator, seeing its stream end as CANCELLED,
draws the final "■ stopped" reply with its stats. One writer per reply: nothing can race it.

- Stop before the answer started (it is still waiting for a place): remembered for that id
  alone, and the answer, when its turn comes, ends at once as stopped.
- Stop after the answer ended, or a second Stop: nothing happens.
Ids are scoped by the browser session, so a page can only stop its own questions.

`WaitingQuestions` holds a question between the moment it is shown and the moment its answer
begins (it may wait in the queue): the server's own bounded store, not Gradio's session state,
so what questions a client leaves unanswered can keep is capped.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass

from ..engine import ReplyStream

Key = tuple[str, str]  # (Gradio session, question id)


class LiveQuestions:
    """Live answers by question, plus bounded memories of early Stops and of ended answers."""

    def __init__(self, remembered: int = 4096) -> None:
        self._lock = threading.Lock()
        self._live: dict[Key, ReplyStream] = {}
        self._stopped_early: OrderedDict[Key, None] = OrderedDict()
        self._ended: OrderedDict[Key, None] = OrderedDict()
        self._remembered = remembered

    def stopped_before_start(self, key: Key) -> bool:
        """Whether Stop was pressed for this question before its answer began."""
        with self._lock:
            return key in self._stopped_early

    def start(self, key: Key, stream: ReplyStream) -> None:
        """The answer to `key` streams from `stream`; a Stop that came first cancels it now."""
        with self._lock:
            self._live[key] = stream
            stopped = key in self._stopped_early
            self._stopped_early.pop(key, None)
        if stopped:
            stream.cancel()

    def end(self, key: Key) -> None:
        """The answer has ended (or was refused): a later Stop for it does nothing."""
        with self._lock:
            self._live.pop(key, None)
            self._stopped_early.pop(key, None)
            _remember(self._ended, key, self._remembered)

    def stop(self, key: Key) -> None:
        """Stop pressed for `key`: cancel its stream, or remember it if it has not started."""
        with self._lock:
            stream = self._live.get(key)
            if stream is None and key not in self._ended:
                _remember(self._stopped_early, key, self._remembered)
        if stream is not None:
            stream.cancel()

    @property
    def live(self) -> int:
        return len(self._live)


def _remember(memory: OrderedDict[Key, None], key: Key, limit: int) -> None:
    memory[key] = None
    memory.move_to_end(key)
    while len(memory) > limit:
        memory.popitem(last=False)


@dataclass(frozen=True)
class WaitingQuestion:
    """A question shown in the chat whose answer has not begun."""

    message: dict  # {"text", "files"} as sent
    history: list[dict]  # the chat before it
    shown: list[dict]  # the chat with it, as the page drew it
    size: int  # the characters of text it holds: what keeping it costs


class WaitingQuestions:
    """Questions waiting for their answer, by key, at most `max_chars` of text in all (the
    oldest are forgotten first: only a client that asks and never lets its answers run loses
    any, and the page then says so)."""

    def __init__(self, max_chars: int = 32_000_000) -> None:
        self.max_chars = max_chars
        self._lock = threading.Lock()
        self._questions: OrderedDict[Key, WaitingQuestion] = OrderedDict()
        self._chars = 0

    def put(self, key: Key, question: WaitingQuestion) -> None:
        with self._lock:
            old = self._questions.pop(key, None)
            self._chars += question.size - (old.size if old else 0)
            self._questions[key] = question
            while self._chars > self.max_chars and len(self._questions) > 1:
                _, forgotten = self._questions.popitem(last=False)
                self._chars -= forgotten.size

    def take(self, key: Key) -> WaitingQuestion | None:
        with self._lock:
            question = self._questions.pop(key, None)
            if question is not None:
                self._chars -= question.size
            return question

    def __len__(self) -> int:
        return len(self._questions)
