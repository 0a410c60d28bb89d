"""Visitors' like / dislike clicks, appended to a local JSON-lines file the operator can read.

Only what the server itself answered can be logged: each finished reply is kept here under a
random id (its foot line on the page names it), and a rating names that id and nothing else.
A client can neither invent questions and answers nor grow the file faster than real replies:
- a rating is one of like, dislike or none (a rating taken back);
- each reply is logged a few times at most (changing one's mind), and only when its rating changes;
- a line is at most `max_line_bytes` (long questions and answers are cut, and say so), and the
  file at most `max_bytes`: past it, it becomes `<name>.1` (replacing the older one) and a new
  file starts, so the log never takes more than twice `max_bytes` of disk;
- every record is one line for every reader: U+2028, U+2029 and NEL, which `str.splitlines()`
  and some JSON-lines tools break lines at, are written as JSON escapes.
One line per click, written whole under a lock: two tabs rating at once never interleave, and
`tail -f` or `jq` can read the file while the demo runs. No addresses, no session ids.
"""

from __future__ import annotations

import json
import os
import secrets
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

from ..model.minicpmv4.tiny import default_cache_dir

RATINGS = {True: "like", False: "dislike", "": "none", None: "none"}  # what Gradio's LikeData says
MAX_TEXT_CHARS = 4000  # of a question and of an answer, as kept for rating and logged
MAX_RATINGS_PER_REPLY = 4
# Characters some line readers split at that `json.dumps(ensure_ascii=False)` writes raw.
LINE_BREAKERS = {"\u2028": "\\u2028", "\u2029": "\\u2029", "\x85": "\\u0085"}


def default_feedback_path() -> Path:
    """Where ratings go unless --feedback-log says otherwise: beside the app's other data."""
    return default_cache_dir() / "feedback.jsonl"


@dataclass
class AnsweredReply:
    """A reply the server produced, as it may be logged: the question's text and file names,
    the answer (without its reasoning), cut to MAX_TEXT_CHARS each."""

    question: str
    images: list[str]
    answer: str
    model: str
    logged: list[str] = field(default_factory=list)  # the ratings written for it so far


class AnsweredReplies:
    """The last `capacity` replies the page produced, by id: what a rating may name."""

    def __init__(self, capacity: int = 1024) -> None:
        self.capacity = capacity
        self._replies: OrderedDict[str, AnsweredReply] = OrderedDict()
        self._lock = threading.Lock()

    def add(self, *, question: str, images: list[str], answer: str, model: str) -> str:
        """Keep one finished reply; returns its id (unguessable: a rating must be given it)."""
        reply_id = secrets.token_hex(12)
        reply = AnsweredReply(question=question[:MAX_TEXT_CHARS], images=[name[:200] for name in images[:16]],
                              answer=answer[:MAX_TEXT_CHARS], model=model)
        with self._lock:
            self._replies[reply_id] = reply
            while len(self._replies) > self.capacity:
                self._replies.popitem(last=False)
        return reply_id

    def rating_to_log(self, reply_id: str | None, rating: str) -> AnsweredReply | None:
        """The reply to log `rating` for, or None: an unknown id, an unchanged rating, or one
        past the few a reply may have."""
        with self._lock:
            reply = self._replies.get(reply_id or "")
            if reply is None or (reply.logged and reply.logged[-1] == rating) \
                    or len(reply.logged) >= MAX_RATINGS_PER_REPLY:
                return None
            reply.logged.append(rating)
            return reply

    def __len__(self) -> int:
        return len(self._replies)


class FeedbackLog:
    """Appends one JSON object per rating; creates the file (and its folder) on first use."""

    def __init__(self, path: str | os.PathLike | None = None, *, max_bytes: int = 50 * 2**20,
                 max_line_bytes: int = 64 * 2**10) -> None:
        self.path = Path(path) if path else default_feedback_path()
        self.max_bytes = max_bytes
        self.max_line_bytes = max_line_bytes
        self._lock = threading.Lock()

    @property
    def rotated(self) -> Path:
        """Where the previous file goes when this one is full."""
        return self.path.with_name(self.path.name + ".1")

    def record(self, rating: str, reply: AnsweredReply) -> dict:
        """Append one rating of `reply` and return what was written."""
        entry = {"time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "rating": rating,
                 "model": reply.model, "question": reply.question, "images": reply.images, "answer": reply.answer}
        line = self._line(entry)
        with self._lock:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if self.path.exists() and self.path.stat().st_size + len(line) > self.max_bytes:
                os.replace(self.path, self.rotated)
            with open(self.path, "ab") as file:
                file.write(line)
        return entry

    def _line(self, entry: dict) -> bytes:
        """`entry` as one line of at most `max_line_bytes`: the texts are halved until it fits
        (and the file names dropped, should the texts be gone and the line still too long)."""
        while True:
            text = json.dumps(entry, ensure_ascii=False)
            for raw, escaped in LINE_BREAKERS.items():
                text = text.replace(raw, escaped)
            line = (text + "\n").encode("utf-8")
            if len(line) <= self.max_line_bytes or not (entry["question"] or entry["answer"] or entry["images"]):
                return line
            shorter = {"question": entry["question"][:len(entry["question"]) // 2],
                       "answer": entry["answer"][:len(entry["answer"]) // 2]}
            if not (entry["question"] or entry["answer"]):
                shorter["images"] = []
            entry = {**entry, **shorter, "truncated": True}
