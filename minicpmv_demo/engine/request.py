"""One request's life in the engine: its settings, and the stream its reply comes back on.

The engine thread writes into a `ReplyStream`; the Gradio handler that submitted the request
reads from it on its own thread. The stream is the only thing the two share.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from enum import Enum


# The widest sampling settings the engine takes (OpenAI's range for temperature).
MAX_TEMPERATURE = 2.0
MAX_REPETITION_PENALTY = 2.0
# What a torch generator takes as a seed (and vLLM as a request's): a 64-bit whole number.
MIN_SEED, MAX_SEED = -(2**63), 2**64 - 1


@dataclass(frozen=True)
class SamplingParams:
    """How one request is decoded. Checked when built: the engine's door for every client.

    One row's NaN temperature would turn the whole batch's probabilities into NaN, so values
    outside these ranges are refused here rather than clamped deep inside a decode step.
    """

    max_new_tokens: int = 512
    temperature: float = 0.0  # 0 means greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 means off: every token may be drawn
    repetition_penalty: float = 1.0  # 1 means off; above 1 makes tokens already in the row rarer
    # A request's own seed: its draws come from a generator of its own, so the same seed gives the
    # same sampled reply whatever else is in the batch. None: the engine's shared generator.
    seed: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int) \
                or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be a whole number of at least 1, not {self.max_new_tokens!r}.")
        if not _number_within(self.temperature, 0.0, MAX_TEMPERATURE):
            raise ValueError(f"temperature must be a number from 0 to {MAX_TEMPERATURE:g}, not {self.temperature!r}.")
        if not _number_within(self.top_p, 0.0, 1.0) or self.top_p == 0:
            raise ValueError(f"top_p must be a number above 0 and at most 1, not {self.top_p!r}.")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k must be a whole number of at least 0 (0 is off), not {self.top_k!r}.")
        if not _number_within(self.repetition_penalty, 0.0, MAX_REPETITION_PENALTY) or self.repetition_penalty == 0:
            raise ValueError(f"repetition_penalty must be a number above 0 and at most "
                             f"{MAX_REPETITION_PENALTY:g}, not {self.repetition_penalty!r}.")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)
                                      or not MIN_SEED <= self.seed <= MAX_SEED):
            raise ValueError(f"seed must be a whole number from {MIN_SEED} to {MAX_SEED}, not {self.seed!r}.")

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0


def _number_within(value: object, low: float, high: float) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            and low <= value <= high)


class FinishReason(str, Enum):
    STOP = "stop"  # the model said it was done (EOS)
    LENGTH = "length"  # max_new_tokens reached
    CANCELLED = "cancelled"
    ERROR = "error"


@dataclass(frozen=True)
class ReplyStats:
    """What the line under a reply shows about how it was produced."""

    tokens: int
    seconds: float
    batch_size: int  # the largest batch this reply shared while it was generated
    peak_memory_mb: float | None  # torch's peak allocation over the batch's lifetime; None on CPU
    finish_reason: FinishReason
    from_cache: bool = False

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


class ReplyError(RuntimeError):
    """The engine could not produce this reply; the message is meant for the user.

    `refused`: the request itself cannot be answered (a prompt longer than the context, a
    backend's 4xx), so trying again unchanged will not help: an API answers it with a 400.
    """

    def __init__(self, message: str, refused: bool = False) -> None:
        super().__init__(message)
        self.refused = refused


class ReplyStream:
    """A reply's text as it grows; written by the engine thread, read by one consumer.

    Readers get the whole text so far (what Gradio wants to stream) and may skip intermediate
    states: updates are coalesced to at most one per `interval`, which keeps a fast model from
    flooding the browser with one message per token. The end is never held back for the
    interval: a user's next question (and the batch slot it fills) waits on it.
    """

    def __init__(self) -> None:
        self._changed = threading.Condition()
        self._text = ""
        self._stats: ReplyStats | None = None
        self._error: str | None = None
        self.refused = False  # the failure is the request's own (see ReplyError)
        self._cancelled = threading.Event()
        self._ended = threading.Event()  # set with the stats or the error; wakes a coalescing reader
        self._end_callbacks: list[Callable[[], None]] = []
        self.notices: list[str] = []  # things the user should know, e.g. "oldest turns left out"
        # The prompt ended inside an open `<think>` block: the reply starts with reasoning
        # (see reasoning.split_reasoning). Set before `submit` returns the stream.
        self.thinking = False
        self.prompt_tokens = 0  # the encoded prompt's length (API usage); set before `submit` returns
        self.submitted_at = time.perf_counter()
        self.first_text_at: float | None = None

    # -- engine side -------------------------------------------------------------------------
    def append(self, text: str) -> None:
        if not text:
            return
        with self._changed:
            if self.first_text_at is None:
                self.first_text_at = time.perf_counter()
            self._text += text
            self._changed.notify_all()

    def finish(self, stats: ReplyStats) -> None:
        with self._changed:
            self._stats = stats
            self._ended.set()
            self._changed.notify_all()
        self._run_end_callbacks()

    def fail(self, message: str, refused: bool = False) -> None:
        """End with `message` for the user; `refused` when the request itself is at fault."""
        with self._changed:
            self._error, self.refused = message, refused
            self._ended.set()
            self._changed.notify_all()
        self._run_end_callbacks()

    def _run_end_callbacks(self) -> None:
        with self._changed:
            callbacks, self._end_callbacks = self._end_callbacks, []
        for callback in callbacks:
            callback()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    # -- consumer side -----------------------------------------------------------------------
    def cancel(self) -> None:
        """Ask the engine to drop this request at its next step (stop button, closed tab)."""
        self._cancelled.set()

    def when_done(self, callback: Callable[[], None]) -> None:
        """Call `callback` once the reply has ended (at once if it has): an event loop can wait
        for the end without a thread blocked on it. It runs on the engine thread: keep it short."""
        with self._changed:
            if not self.done:
                self._end_callbacks.append(callback)
                return
        callback()

    @property
    def done(self) -> bool:
        return self._ended.is_set()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the reply has ended (or `timeout` passes); returns whether it ended."""
        return self._ended.wait(timeout)

    @property
    def text(self) -> str:
        return self._text

    @property
    def stats(self) -> ReplyStats | None:
        return self._stats

    @property
    def error(self) -> str | None:
        """The failure's message for the user; None unless the reply failed."""
        return self._error

    def updates(self, interval: float | Callable[[], float] = 0.0) -> Iterator[str]:
        """Yield the accumulated text each time it grew; raise ReplyError if the engine failed it.

        `interval` may be a function, asked after each update: the pace can follow the load.
        """
        sent = ""
        while True:
            with self._changed:
                self._changed.wait_for(lambda seen=sent: self._text != seen or self.done)
                text, done, error = self._text, self.done, self._error
            if text != sent:
                sent = text
                yield text
            if error is not None:
                raise ReplyError(error, self.refused)
            if done:
                return
            pause = interval() if callable(interval) else interval
            if pause:
                self._ended.wait(pause)  # coalesce tokens, but deliver the end at once

    def result(self, timeout: float | None = None) -> str:
        """Block until the reply is complete and return its text (the OpenAI route without
        streaming, tests, benchmarks). Waits for the end alone: not woken at every token."""
        if not self.wait(timeout):
            raise TimeoutError("reply not finished in time")
        if self._error is not None:
            raise ReplyError(self._error, self.refused)
        return self._text
