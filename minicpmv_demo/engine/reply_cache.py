"""Remembered greedy replies: a greedy answer to the same chat with the same settings is the same.

Demo visitors click the same example over and over; answering those from memory keeps the GPU
for new questions.
"""

from __future__ import annotations

import threading
from collections import OrderedDict


class ReplyCache:
    """A thread-safe LRU of reply text keyed by chat digest + sampling settings."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._entries: OrderedDict[str, str] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0

    def get(self, key: str) -> str | None:
        with self._lock:
            text = self._entries.get(key)
            if text is not None:
                self._entries.move_to_end(key)
                self.hits += 1
            return text

    def put(self, key: str, text: str) -> None:
        if self.capacity <= 0:
            return
        with self._lock:
            self._entries[key] = text
            self._entries.move_to_end(key)
            while len(self._entries) > self.capacity:
                self._entries.popitem(last=False)
