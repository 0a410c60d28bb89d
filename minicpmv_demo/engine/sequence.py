"""What a running request holds: its prompt, its settings, the tokens it generated so far, and how
it takes each new token (the reasoning budget, stop tokens, the detokenizer, its length limit).

The engine hands every row of a step its token through `Sequence.take`; whatever goes wrong
there (unusable logits, a token the detokenizer cannot take) ends that request alone, with a
message for its user, and the rest of the batch goes on.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from .detokenizer import IncrementalDecoder
from .reasoning_budget import ReasoningBudget
from .request import FinishReason, ReplyStats, ReplyStream, SamplingParams

log = logging.getLogger(__name__)

INVALID_OUTPUT_MESSAGE = ("The model produced invalid numbers for this request, so it was stopped. "
                          "Please try again, perhaps with a lower temperature.")
FAILED_MESSAGE = "The model could not answer this request. Please try again."


class SequenceStatus(str, Enum):
    WAITING = "waiting"  # in the scheduler's line
    RUNNING = "running"  # prefilled (or being prefilled in pieces) and decoding
    FINISHED = "finished"  # its reply has ended: stop, length, cancel or error


@dataclass(eq=False)  # each request is itself: compared and hashed by identity
class Sequence:
    """One request inside the engine: what it asked, and what it generated so far."""

    stream: ReplyStream
    prompt: Any  # what the runner's `encode` made of the conversation (has `.length`, `.ids`, `.thinking`)
    params: SamplingParams
    decoder: IncrementalDecoder
    cache_key: str | None = None  # where a finished greedy reply goes in the reply cache
    reasoning: ReasoningBudget | None = None  # caps a thinking request's reasoning (reasoning_budget.py)
    generated: list[int] = field(default_factory=list)
    status: SequenceStatus = SequenceStatus.WAITING
    finish_reason: FinishReason | None = None  # set when it ends; it leaves the batch at the next release
    started_at: float = 0.0  # when its prefill began (0: not yet)
    largest_batch: int = 1  # the largest batch it shared, for the reply's stats line

    @property
    def length(self) -> int:
        """Tokens it holds: the prompt and what it generated (what a re-prefill must read)."""
        return self.prompt.length + len(self.generated)

    @property
    def cancelled(self) -> bool:
        return self.stream.cancelled

    def start(self, now: float | None = None) -> None:
        """Its prefill begins (a re-admitted request keeps its first start)."""
        self.status = SequenceStatus.RUNNING
        self.started_at = self.started_at or (now if now is not None else time.perf_counter())

    def take(self, token: int | None, stop_token_ids: frozenset[int]) -> None:
        """One step's token for this request (None: its logits were unusable); a fault fails it alone."""
        if token is None:
            log.warning("a row's logits were not usable (NaN or inf); failing that request alone")
            self.fail(INVALID_OUTPUT_MESSAGE)
            return
        try:
            self._accept(token, stop_token_ids)
        except Exception:  # noqa: BLE001 - one row's fault must not end the others
            log.exception("a row failed while taking its token; failing that request alone")
            self.fail(FAILED_MESSAGE)

    def _accept(self, token: int, stop_token_ids: frozenset[int]) -> None:
        """A stop token ends the request without counting as text; a spent reasoning budget
        closes the reasoning (the token becomes `</think>`) rather than ending it."""
        if self.reasoning is not None:
            token, notice = self.reasoning.steer(token)
            if notice:
                self.stream.notices.append(notice)
        if token in stop_token_ids:
            self.finish_reason = FinishReason.STOP
            return
        self.generated.append(token)
        self.stream.append(self.decoder.push(token))
        if len(self.generated) >= self.params.max_new_tokens:
            self.finish_reason = FinishReason.LENGTH

    def mark_cancelled(self) -> None:
        """A request whose client left (Stop, a closed tab) ends at the next release."""
        if self.finish_reason is None and self.cancelled:
            self.finish_reason = FinishReason.CANCELLED

    def fail(self, message: str) -> None:
        """End with a message for the user; the stream ends now, the row leaves at the next release."""
        self.finish_reason = FinishReason.ERROR
        self.status = SequenceStatus.FINISHED
        self.stream.fail(message)

    def finish(self, reason: FinishReason, peak_memory_mb: float | None) -> None:
        """End the reply with its stats line."""
        self.status = SequenceStatus.FINISHED
        seconds = time.perf_counter() - self.started_at if self.started_at else 0.0
        self.stream.finish(ReplyStats(tokens=len(self.generated), seconds=seconds, batch_size=self.largest_batch,
                                      peak_memory_mb=peak_memory_mb, finish_reason=reason))
