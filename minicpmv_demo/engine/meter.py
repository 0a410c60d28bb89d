"""Tokens per second over the last few seconds: what the panel, /health and the plots show.

Written by whoever produces tokens (the engine thread, the backend client's loop), read by status
panels on other threads: one lock, and old entries dropped as new ones come in.
"""

from __future__ import annotations

import threading
import time
from collections import deque

WINDOW_S = 5.0


class TokenMeter:
    """Counts tokens with their time; `per_second()` is the rate over the last WINDOW_S."""

    def __init__(self, window_s: float = WINDOW_S) -> None:
        self.window_s = window_s
        self._lock = threading.Lock()
        self._recent: deque[tuple[float, int]] = deque()  # (time, tokens)

    def count(self, tokens: int) -> None:
        now = time.monotonic()
        with self._lock:
            self._recent.append((now, tokens))
            self._drop_before(now - self.window_s)

    def per_second(self) -> float:
        with self._lock:
            self._drop_before(time.monotonic() - self.window_s)
            return sum(n for _, n in self._recent) / self.window_s

    def _drop_before(self, start: float) -> None:
        while self._recent and self._recent[0][0] < start:
            self._recent.popleft()
