"""Visitors' like / dislike clicks, appended to a local JSON-lines file the operator can read.

One line per click, written whole under a lock, so two tabs rating at once never interleave
and `tail -f` or `jq` can read the file while the demo runs. Only what was rated is kept
(question text, answer text, image file names): no addresses, no session ids.
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

from ..model.minicpmv4.tiny import default_cache_dir


def default_feedback_path() -> Path:
    """Where ratings go unless --feedback-log says otherwise: beside the app's other data."""
    return default_cache_dir() / "feedback.jsonl"


class FeedbackLog:
    """Appends one JSON object per rating; creates the file (and its folder) on first use."""

    def __init__(self, path: str | os.PathLike | None = None) -> None:
        self.path = Path(path) if path else default_feedback_path()
        self._lock = threading.Lock()

    def record(self, *, rating: str, question: str, answer: str, images: list[str], model: str) -> dict:
        """Append one rating and return what was written."""
        entry = {"time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "rating": rating, "model": model,
                 "question": question, "images": images, "answer": answer}
        line = json.dumps(entry, ensure_ascii=False) + "\n"
        with self._lock:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a", encoding="utf-8") as file:
                file.write(line)
        return entry
