"""A small thread-safe least-recently-used cache: the one kind of memory the demo keeps.

Used for greedy replies (visitors click the same example again and again), checked pictures,
preprocessed pictures and vision-tower outputs (follow-up turns resend the same images).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

Value = TypeVar("Value")


class LruCache(Generic[Value]):
    """At most `capacity` in all (0 keeps nothing); the least recently used entry leaves first.

    Without `size` every entry counts 1, so `capacity` is an entry count. With `size` (e.g.
    `byte_size`) an entry counts what `size(value)` says: pictures and tensors differ a
    thousandfold, so only their bytes bound the memory. An entry larger than the whole capacity
    is not kept (it would push out everything else and still not fit).
    """

    def __init__(self, capacity: int, size: Callable[[Value], int] | None = None) -> None:
        self.capacity = capacity
        self._size = size or _one
        self._entries: OrderedDict[Hashable, tuple[Value, int]] = OrderedDict()
        self._lock = threading.Lock()
        self.total = 0  # sum of the entries' sizes
        self.hits = 0

    def get(self, key: Hashable) -> Value | None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return None
            self._entries.move_to_end(key)
            self.hits += 1
            return entry[0]

    def put(self, key: Hashable, value: Value) -> None:
        size = self._size(value)
        if self.capacity <= 0 or size > self.capacity:
            return
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self.total -= old[1]
            self._entries[key] = (value, size)
            self.total += size
            while self.total > self.capacity:
                _, (_, evicted) = self._entries.popitem(last=False)
                self.total -= evicted


def _one(_value: object) -> int:
    return 1
