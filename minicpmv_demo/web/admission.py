"""Who may reach the engine now: one count of chat requests shared by the page and the API.

The page's events are admitted by Gradio's queue (`--concurrency` at once, `--queue-size`
waiting). The OpenAI routes bypass that queue, so they are admitted here, against the same
numbers and counting the page's requests too: the API can neither crowd out the page nor push
the engine past `--concurrency`. Checking and counting happen under one lock, so a burst of
API calls cannot all slip past the limit before any of them is counted. A waiting API request
holds no thread: it waits on its event loop.
"""

from __future__ import annotations

import asyncio
import threading
from collections import deque
from collections.abc import Callable


class Busy(Exception):
    """More requests are waiting than `--queue-size` allows; the client should retry later."""


class _Waiter:
    """An API request waiting for a turn; `granted` is set under the gate's lock."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.turn: asyncio.Future = loop.create_future()
        self.granted = False


class RequestGate:
    """At most `concurrency` requests inside at once and `queue_size` waiting for a turn."""

    def __init__(self, concurrency: int, queue_size: int) -> None:
        self.concurrency = concurrency
        self.queue_size = queue_size
        self._lock = threading.Lock()
        self._inside = 0
        self._waiters: deque[_Waiter] = deque()

    @property
    def inside(self) -> int:
        return self._inside

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    def enter_admitted(self) -> Callable[[], None]:
        """Count a request that Gradio's queue already admitted (never waits); returns its exit."""
        with self._lock:
            self._inside += 1
        return self._exit_once()

    async def enter(self) -> Callable[[], None]:
        """Wait for a turn (raises Busy when the waiting line is full); returns the exit to call.

        A waiter cancelled while waiting (its client hung up) leaves the line, and a turn
        handed to it in that same moment is passed on, so no slot ever leaks.
        """
        with self._lock:
            if self._inside < self.concurrency and not self._waiters:
                self._inside += 1
                return self._exit_once()
            if len(self._waiters) >= self.queue_size:
                raise Busy
            waiter = _Waiter(asyncio.get_running_loop())
            self._waiters.append(waiter)
        try:
            await waiter.turn
        except asyncio.CancelledError:
            with self._lock:
                granted = waiter.granted
                if not granted:
                    self._waiters.remove(waiter)
            if granted:
                self._exit()  # the turn arrived as the waiter gave up: hand it on
            raise
        return self._exit_once()

    def _exit_once(self) -> Callable[[], None]:
        done = threading.Event()

        def exit_gate() -> None:
            if not done.is_set():
                done.set()
                self._exit()

        return exit_gate

    def _exit(self) -> None:
        """Hand the slot to the first waiter, or free it."""
        with self._lock:
            if not self._waiters:
                self._inside -= 1
                return
            waiter = self._waiters.popleft()
            waiter.granted = True
        waiter.loop.call_soon_threadsafe(_grant, waiter.turn)


def _grant(turn: asyncio.Future) -> None:
    if not turn.done():
        turn.set_result(None)
