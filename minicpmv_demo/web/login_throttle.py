"""Failed logins per client address in a sliding window: how password guessing is slowed down.

A client that failed `limit` times within `window_s` seconds is refused (HTTP 429) until the
oldest of those failures leaves the window. Other addresses are not affected, so one guesser
cannot lock the real user out. Used from the event loop only, hence no lock.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict, deque
from collections.abc import Callable

WINDOW_S = 60.0
MAX_CLIENTS = 10_000  # a table bounded in memory however many addresses try


class LoginThrottle:
    def __init__(self, limit: int, window_s: float = WINDOW_S, max_clients: int = MAX_CLIENTS,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.limit, self.window_s, self.max_clients, self.clock = limit, window_s, max_clients, clock
        # client -> times of its latest failures (at most `limit`); least recently failed first.
        self._failures: OrderedDict[str, deque[float]] = OrderedDict()

    def retry_after(self, client: str) -> int:
        """Whole seconds until `client` may try again; 0 when it may try now."""
        times = self._failures.get(client)
        if times is None or len(times) < self.limit:
            return 0
        wait = times[0] + self.window_s - self.clock()
        return math.ceil(wait) if wait > 0 else 0

    def failed(self, client: str) -> None:
        now = self.clock()
        times = self._failures.pop(client, None) or deque(maxlen=self.limit)
        times.append(now)
        self._failures[client] = times
        self._prune(now)

    def succeeded(self, client: str) -> None:
        """A right password forgets the client's typos."""
        self._failures.pop(client, None)

    def __len__(self) -> int:
        return len(self._failures)

    def _prune(self, now: float) -> None:
        """Drop clients whose last failure left the window, and the stalest beyond the cap."""
        while self._failures:
            client, times = next(iter(self._failures.items()))
            if times[-1] + self.window_s > now and len(self._failures) <= self.max_clients:
                break
            del self._failures[client]
