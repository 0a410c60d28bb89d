"""A process-wide bound on the pixels being decoded at once, so a burst of uploads cannot
multiply memory by the number of users.

Each decoding thread holds its whole picture in memory (36 MP take 144 MB in Pillow, more with
conversion copies); sixteen visitors sending large pictures at the same moment would hold
gigabytes. Decoding is CPU work (Pillow lets go of the GIL while it decodes), so pictures beyond
what the cores can decode at once only wait in memory: making them wait before decoding costs
no throughput.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager


class PixelBudget:
    """At most `capacity` pixels reserved at once; one picture alone may always go, however big.

    Reservations are served first come, first served, so a large picture is not overtaken for
    ever by a stream of small ones.
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.in_use = 0
        self.peak = 0  # the most pixels ever reserved at once (for tests and benchmarks)
        self._queue: deque[object] = deque()
        self._changed = threading.Condition()

    @property
    def waiting(self) -> int:
        """Reservations waiting for their turn or for room."""
        with self._changed:
            return len(self._queue)

    @contextmanager
    def reserve(self, pixels: int) -> Iterator[None]:
        """Wait for the turn and the room to decode `pixels`; give them back on leaving."""
        with self._changed:
            turn = object()
            self._queue.append(turn)
            try:
                while self._queue[0] is not turn or (self.in_use and self.in_use + pixels > self.capacity):
                    self._changed.wait()
            finally:
                self._queue.remove(turn)
                self._changed.notify_all()  # the next in line may fit too (or may now be first)
            self.in_use += pixels
            self.peak = max(self.peak, self.in_use)
        try:
            yield
        finally:
            with self._changed:
                self.in_use -= pixels
                self._changed.notify_all()
