"""The questions the page is answering, by the id each question gets when it is sent, so that
Stop cancels exactly the answer it was pressed for.

The page creates the id in the browser when a question is sent (a retry or an edit is a new
question with a new id) and Stop names it. Stop never cancels Gradio's event: it cancels that
question's engine stream, and the answer's own generator, seeing its stream end as CANCELLED,
draws the final "■ stopped" reply with its stats. One writer per reply: a session asks its next
question only once its answer has ended (`busy`), so two answers never write one chat.

- Stop while the question waits for its turn: it ends there, drawn stopped, and its answer,
  when the turn comes, finds nothing to do. Stop while its answer is being prepared: remembered
  for that id alone, and the answer ends at once as stopped.
- Stop after the answer ended, or a second Stop: nothing happens.
Ids are scoped by the browser session, so a page can only stop its own questions, and are 24
hex digits (what the page script makes): anything else names no question.

`WaitingQuestions` holds a question between the moment it is shown and the moment its answer
begins (it may wait in the queue): the server's own bounded store, not Gradio's session state,
so what questions a client leaves unanswered can keep is capped.
"""

from __future__ import annotations

import re
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field

from ..engine import ReplyStream

Key = tuple[str, str]  # (Gradio session, question id)
QUESTION_ID = re.compile(r"[0-9a-f]{24}")


def question_key(session: str | None, question_id: object) -> Key | None:
    """The key of a question the page named, or None when the id is not one the page makes."""
    if not isinstance(question_id, str) or not QUESTION_ID.fullmatch(question_id):
        return None
    return session or "", question_id


class LiveQuestions:
    """Live answers by question, plus bounded memories of early Stops and of ended answers."""

    def __init__(self, remembered: int = 4096) -> None:
        self._lock = threading.Lock()
        self._live: dict[Key, ReplyStream | None] = {}  # None: begun, its stream not made yet
        self._stopped_early: OrderedDict[Key, None] = OrderedDict()
        self._ended: OrderedDict[Key, None] = OrderedDict()
        self._remembered = remembered

    def stopped_before_start(self, key: Key) -> bool:
        """Whether Stop was pressed for this question before its answer began."""
        with self._lock:
            return key in self._stopped_early

    def begin(self, key: Key) -> bool:
        """The answer to `key` is being prepared (its stream does not exist yet): the session is
        busy from now on. False when an answer to `key` is already live (left as it is)."""
        with self._lock:
            if key in self._live:
                return False
            self._live[key] = None
            return True

    def drop(self, key: Key) -> None:
        """Undo `begin`: there was nothing to answer after all."""
        with self._lock:
            if key in self._live and self._live[key] is None:  # begun, never started
                del self._live[key]

    def busy(self, session: str) -> bool:
        """Whether an answer of this session is being prepared or streams."""
        with self._lock:
            return any(live_session == session for live_session, _ in self._live)

    def known(self, key: Key) -> bool:
        """Whether this question's answer began (and may have ended) here."""
        with self._lock:
            return key in self._live or key in self._ended

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
    size: int  # what keeping it costs, in characters (its text, and a fixed share per entry and file)
    at: float = field(default_factory=time.monotonic)


class WaitingQuestions:
    """Questions waiting for their answer, by key: at most `max_questions`, `max_chars` in all, and
    none older than `max_age` seconds (a question whose tab closed while it waited in the queue
    is never answered). Past a bound the oldest are forgotten first; only a flood of questions
    whose answers never run makes a visitor's question go, and its answer then says so."""

    def __init__(self, max_chars: int = 32_000_000, max_questions: int = 4096, max_age: float = 3600.0) -> None:
        self.max_chars = max_chars
        self.max_questions = max_questions
        self.max_age = max_age
        self._lock = threading.Lock()
        self._questions: OrderedDict[Key, WaitingQuestion] = OrderedDict()
        self._chars = 0

    def put(self, key: Key, question: WaitingQuestion) -> None:
        with self._lock:
            old = self._questions.pop(key, None)
            self._chars += question.size - (old.size if old else 0)
            self._questions[key] = question
            oldest_kept = question.at - self.max_age
            while len(self._questions) > 1 and (
                    self._chars > self.max_chars or len(self._questions) > self.max_questions
                    or next(iter(self._questions.values())).at < oldest_kept):
                _, forgotten = self._questions.popitem(last=False)
                self._chars -= forgotten.size

    def take(self, key: Key) -> WaitingQuestion | None:
        with self._lock:
            question = self._questions.pop(key, None)
            if question is not None:
                self._chars -= question.size
            return question

    def waiting(self, session: str) -> bool:
        """Whether a question of this session waits for its answer."""
        with self._lock:
            return any(waiting_session == session for waiting_session, _ in self._questions)

    def __len__(self) -> int:
        return len(self._questions)
