"""Who runs next: the waiting line, and the rules that let a waiting request into the batch.

A request joins the running batch when there is a place under the batch ceiling, and the
newcomers prefilled together stay under a token budget and, on a GPU, their prefill's memory fits
what is free now (the running rows' caches sit in preallocated slots already: only the prefill's
activations and its cache before the merge are new). A long
prompt that arrives while others generate is prefilled in pieces instead (one at a time), so it
delays the others by a piece's time, not by its whole prefill. Running out of memory lowers the
ceiling for a while; it grows back one place after each run of steps without running out.

The scheduler only decides: the engine executes (prefills, steps, and finishes requests).
Nothing here touches the model, so these rules are tested without one.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from .sequence import Sequence, SequenceStatus

# Most (padded) prompt tokens prefilled in one call: bounds the activation memory of a burst.
PREFILL_TOKEN_BUDGET = 16384
# A prompt longer than this, arriving while others generate, is prefilled this many tokens at a
# time with a decode step for the others between pieces: a long chat then delays everyone else by
# a piece's time (tens of ms), not by its whole prefill (0.75 s for 4k tokens of the tiny model
# on one CPU core).
PREFILL_PIECE_TOKENS = 256
# After this many decode steps without running out of memory, the batch ceiling grows by one
# again, so one oversized burst does not slow the demo down for good.
STEPS_TO_RECOVER_CEILING = 64


@dataclass
class Admission:
    """What the scheduler lets in now: requests to prefill together, and maybe one to prefill
    in pieces."""

    newcomers: list[Sequence] = field(default_factory=list)
    piecewise: Sequence | None = None


class Scheduler:
    """The waiting line and the admission rules; safe to `add` to from any thread."""

    def __init__(self, max_batch: int, prefill_bytes: Callable[[int, int], int] | None = None,
                 headroom: Callable[[], int | None] | None = None,
                 on_cancelled: Callable[[Sequence], None] = lambda sequence: None) -> None:
        """`prefill_bytes(rows, width)`: the memory a prefill of `rows` rows padded to `width`
        tokens takes; `headroom()`: the memory free for it now (None: not counted, the CPU);
        `on_cancelled` ends a request whose client left while it waited."""
        self.max_batch = max_batch
        self.ceiling = max_batch
        self._prefill_bytes = prefill_bytes
        self._headroom = headroom
        self._on_cancelled = on_cancelled
        self._waiting: deque[Sequence] = deque()
        self._wake = threading.Condition()
        self._steps_since_oom = 0

    # -- the line ------------------------------------------------------------------------------
    @property
    def queue_depth(self) -> int:
        return len(self._waiting)

    def add(self, sequence: Sequence) -> None:
        with self._wake:
            self._waiting.append(sequence)
            self._wake.notify()

    def wake(self) -> None:
        """Wake the engine thread from `wait` (shutdown)."""
        with self._wake:
            self._wake.notify_all()

    def wait(self, idle: Callable[[], bool]) -> None:
        """Block while nobody waits and `idle()` holds (no running rows, not stopping)."""
        with self._wake:
            while not self._waiting and idle():
                self._wake.wait()

    def drop_cancelled(self) -> None:
        """End waiting requests whose clients left, without waiting for a free place: their place
        in the line (and in the API's count of requests) goes to others now."""
        with self._wake:
            if not any(sequence.cancelled for sequence in self._waiting):
                return
            cancelled = [sequence for sequence in self._waiting if sequence.cancelled]
            self._waiting = deque(sequence for sequence in self._waiting if not sequence.cancelled)
        for sequence in cancelled:
            self._on_cancelled(sequence)

    def next_waiting(self) -> Sequence | None:
        """The first request in line whose client is still there (others are ended on the way)."""
        while True:
            with self._wake:
                sequence = self._waiting.popleft() if self._waiting else None
            if sequence is None or not sequence.cancelled:
                return sequence
            self._on_cancelled(sequence)

    def requeue_front(self, sequences: list[Sequence]) -> None:
        """Put requests back at the head of the line, in order (they were first)."""
        for sequence in sequences:
            sequence.status = SequenceStatus.WAITING
        with self._wake:
            self._waiting.extendleft(reversed(sequences))

    # -- admission -----------------------------------------------------------------------------
    def schedule(self, running: list[Sequence], piecewise: Sequence | None, can_split: bool) -> Admission:
        """Waiting requests for the free places, while the prefill's tokens and memory allow.

        `piecewise`: the long prompt already being prefilled in pieces (it holds a place);
        `can_split`: whether the runner can prefill a prompt in pieces at all. With nothing
        running and nothing admitted, the first in line is always let in (if it cannot fit
        even alone, its prefill says so).
        """
        admission = Admission()
        newcomers = admission.newcomers
        room = self._headroom() if self._headroom is not None and self._prefill_bytes is not None else None
        width = 0  # the longest newcomer: every row of the prefill is padded to it
        while len(running) + len(newcomers) + bool(piecewise) < self.ceiling:
            sequence = self.next_waiting()
            if sequence is None:
                break
            crowded = running or newcomers
            if crowded and can_split and sequence.length > PREFILL_PIECE_TOKENS:
                if piecewise is not None or not self._fits(room, 1, PREFILL_PIECE_TOKENS):
                    self.requeue_front([sequence])
                    break
                piecewise = admission.piecewise = sequence
                continue
            row_width = max(width, sequence.length)
            if crowded and (row_width * (len(newcomers) + 1) > PREFILL_TOKEN_BUDGET
                            or not self._fits(room, len(newcomers) + 1, row_width)):
                self.requeue_front([sequence])
                break
            width = row_width
            newcomers.append(sequence)
        return admission

    def _fits(self, room: int | None, rows: int, width: int) -> bool:
        return room is None or self._prefill_bytes(rows, width) <= room

    # -- the batch ceiling ---------------------------------------------------------------------
    def after_step(self) -> None:
        """A decode step ran without running out of memory: the ceiling recovers, slowly."""
        self._steps_since_oom += 1
        if self._steps_since_oom >= STEPS_TO_RECOVER_CEILING and self.ceiling < self.max_batch:
            self.ceiling += 1
            self._steps_since_oom = 0

    def after_out_of_memory(self, running: int, newcomers: int) -> None:
        """`newcomers` did not fit beside `running` rows (all of them: a step's whole batch is
        re-admitted as newcomers): admit half of them for a while."""
        self.ceiling = max(1, running + newcomers // 2)
        self._steps_since_oom = 0
