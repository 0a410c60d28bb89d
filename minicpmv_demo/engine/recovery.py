"""How the engine recovers: a request that breaks its prefill fails alone, running out of memory
lowers the batch ceiling and re-admits the rows from their text so far, any other failure of a
step fails the rows in hand, and a broken device (a sticky CUDA error) stops the engine for a
restart. Every handler runs after the failed call's `except` block (see `failures.attempt`), so no
traceback pins the failed step's tensors while memory is freed and rows are prefilled again.

Part of `Engine` (engine.py), kept apart so the serving loop reads without its failure paths.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from .failures import GPU_FAILED_MESSAGE, TOO_LARGE_MESSAGE, Failure, attempt, free_memory

if TYPE_CHECKING:
    from .sequence import Sequence

log = logging.getLogger(__name__)


class Recovery:
    """The engine's failure paths (mixed into `Engine`, whose state they read and change)."""

    def _fail_all(self, message: str) -> None:
        piecewise = [self._piecewise[0]] if self._piecewise else []
        for sequence in [*self.running, *piecewise]:
            self.fail(sequence, message)
        self.running, self._piecewise = [], None
        self._batch = self.runner.empty(self._batch) if self._use_slots else None
        self.reset_peak()

    def _on_prefill_failure(self, newcomers: list[Sequence], failure: Failure) -> None:
        free_memory()
        if failure.sticky:
            self._die(failure, newcomers)
            return
        if failure.out_of_memory and (self.running or len(newcomers) > 1):
            # Too much at once: admit fewer (and wait for running rows to finish first).
            self.scheduler.after_out_of_memory(len(self.running), len(newcomers))
            self.scheduler.requeue_front(newcomers)
            log.warning("out of memory admitting %d request(s); batch ceiling now %d", len(newcomers),
                        self.scheduler.ceiling)
            return
        if len(newcomers) > 1:
            # Find the request that broke the prefill: each alone, the others still get served.
            for sequence in newcomers:
                prefilled, solo = attempt(lambda sequence=sequence: self._prefill([sequence]))
                if solo is not None:
                    self._on_prefill_failure([sequence], solo)
                else:
                    self._add_rows([sequence], *prefilled)
            return
        log.warning("request failed in prefill: %s", failure.description)
        self.fail(newcomers[0], failure.message)

    def _on_batch_failure(self, failure: Failure) -> None:
        """A decode step (or the loop) failed for the whole batch: out of memory re-admits the
        rows, a broken device ends the engine, anything else fails the rows in hand."""
        if failure.sticky:
            self._die(failure)
        elif failure.out_of_memory and self.running:
            self._on_step_out_of_memory()
        else:
            log.error("engine loop failed (%s); failing the current batch and carrying on", failure.description)
            self.restarts += 1
            self._fail_all("The model failed while answering. Please try again.")

    def _die(self, failure: Failure, newcomers: list[Sequence] = ()) -> None:
        """The device is broken for good: fail everyone (the running rows, `newcomers` whose
        prefill broke, those waiting), stop, and let the process be restarted (`on_fatal`);
        /health says down meanwhile."""
        log.critical("the GPU failed (%s): stopping the engine for a restart", failure.description)
        self.fatal = failure.description
        self._stopping = True
        for sequence in newcomers:
            self.fail(sequence, GPU_FAILED_MESSAGE)
        self._fail_all(GPU_FAILED_MESSAGE)
        while (sequence := self.scheduler.next_waiting()) is not None:
            self.fail(sequence, GPU_FAILED_MESSAGE)
        if self.on_fatal is not None:
            self.on_fatal(failure.description)

    def _on_step_out_of_memory(self) -> None:
        """Halve the batch ceiling and re-admit every row from its text so far.

        A step that ran out of memory may have updated some layers' caches and not others, so
        no row's cache is trusted: each row is re-prefilled from its prompt plus the tokens it
        already streamed, which continues it exactly where it was.
        """
        rows, self.running = self.running, []
        self._batch = self.runner.empty(self._batch) if self._use_slots else None
        free_memory()
        if len(rows) == 1:
            self.fail(rows[0], TOO_LARGE_MESSAGE)
            self.reset_peak()
            return
        self.scheduler.after_out_of_memory(0, len(rows))
        self.scheduler.requeue_front(rows)
        log.warning("out of memory in a batch of %d: re-admitting them; batch ceiling now %d",
                    len(rows), self.scheduler.ceiling)

