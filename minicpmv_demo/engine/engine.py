"""The engine: one thread owns the model; every request is a row in its running batch.

Gradio handlers call `submit()` and read the returned `ReplyStream`; they never touch the model.
The engine thread loops: admit waiting requests (prefill them together, merge them into the batch),
run one decode step for all rows, hand each row its token, and let finished or cancelled rows
leave. A request that arrives mid-generation therefore starts at the next step instead of
waiting for the others' long answers, and no two threads are ever inside the model (which
bitsandbytes int4 and `generate()` do not survive).

Out of memory in a step halves the batch ceiling for a while and re-admits the rows from their
text so far (the older half first); a request that cannot fit even alone gets a clear error.
Any other failure fails only the requests in that batch; the loop goes on.
"""

from __future__ import annotations

import gc
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field, replace

import torch

from ..intake.conversation import Conversation
from ..system.gpu import peak_memory_mb, reset_peak_memory
from ..system.lru import LruCache
from .context import ContextError, fit_to_context
from .contract import EngineState
from .detokenizer import IncrementalDecoder
from .meter import TokenMeter
from .reasoning_budget import ReasoningBudget, budget_for
from .request import FinishReason, ReplyStats, ReplyStream, SamplingParams
from .sampling import sample_for
from .seen_tokens import SeenTokens
from .slots import fill_holes

log = logging.getLogger(__name__)

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
class _Row:
    """A request inside the engine: what it asked, and what it generated so far."""

    stream: ReplyStream
    prompt: object
    params: SamplingParams
    decoder: IncrementalDecoder
    cache_key: str | None
    generated: list[int] = field(default_factory=list)
    finish_reason: FinishReason | None = None
    started_at: float = 0.0
    largest_batch: int = 1
    reserved_bytes: int = 0
    reasoning: ReasoningBudget | None = None  # caps a thinking row's reasoning (reasoning_budget.py)


@dataclass(frozen=True)
class _CachedReply:
    """A finished greedy reply, with what its stream said about it besides the text."""

    text: str
    thinking: bool
    prompt_tokens: int
    tokens: int


class Engine:
    """Owns a model runner on one thread and serves every request through it."""

    def __init__(self, runner, *, max_batch: int = 8, cache_size: int = 128,
                 memory_budget_bytes: int | None = None, seed: int = 0, batch_call=None,
                 max_thinking_tokens: int = 0, max_model_len: int = 0, enforce_eager: bool = False) -> None:
        """`batch_call` (ZeroGPU only, see zerogpu.py) runs each batch to the end in one GPU call.
        `max_thinking_tokens`: each reply's reasoning budget (0 = no cap; the app passes
        --max-thinking-tokens), see reasoning_budget.py.

        Runners with preallocated slots (`new_slots`) get `max_batch` slots of `max_model_len`
        tokens (0: sized from `memory_budget_bytes`), and, unless `enforce_eager`, captured
        decode steps where the device allows; ZeroGPU keeps no state between calls, so no slots.
        """
        self.runner = runner
        self.max_thinking_tokens = max_thinking_tokens
        self.batch_call = batch_call
        self.max_batch = max_batch if runner.supports_batching else 1
        self.ceiling = self.max_batch
        self.memory_budget_bytes = memory_budget_bytes
        self.enforce_eager = enforce_eager
        self._use_slots = hasattr(runner, "new_slots") and runner.supports_batching and batch_call is None
        self.context_length = (runner.slot_length(self.max_batch, max_model_len, memory_budget_bytes)
                               if self._use_slots else runner.context_length)
        self.reply_cache: LruCache[_CachedReply] = LruCache(cache_size)  # greedy replies by chat and settings
        self._token_texts: dict[int, str] = {}  # each token's text alone, for the rows' decoders
        self._seed = seed
        self._generator: torch.Generator | None = None
        self._seen = SeenTokens()  # prompt and reply tokens of rows with a repetition penalty
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._waiting: deque[_Row] = deque()
        self._rows: list[_Row] = []
        self._batch = None
        self._piecewise: tuple[_Row, object] | None = None  # a long prompt being prefilled in pieces
        self._steps_since_oom = 0
        self.meter = TokenMeter()  # tokens/s over the last seconds, for status panels
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._restart_lock = threading.Lock()
        self.restarts = 0

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self) -> Engine:
        if self._use_slots and self._batch is None:
            self._batch = self.runner.new_slots(self.max_batch, self.context_length, capture=not self.enforce_eager)
        self._thread = threading.Thread(target=self._run, name="minicpmv-engine", daemon=True)
        self._thread.start()
        return self

    def shutdown(self, timeout: float = 10.0) -> None:
        with self._wake:
            self._stopping = True
            self._wake.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    def _restart_if_dead(self) -> None:
        """The loop survives model errors by itself; this covers anything that still kills it."""
        with self._restart_lock:  # several handlers may notice at once; one restart is enough
            if self._thread is not None and not self._thread.is_alive() and not self._stopping:
                log.error("engine thread was dead; starting a new one")
                self.restarts += 1
                self._fail_all("The model engine restarted; please try again.")
                self.start()

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # -- the handlers' side ------------------------------------------------------------------
    def submit(self, conversation: Conversation, params: SamplingParams) -> ReplyStream:
        """Queue a reply to `conversation`; returns at once with the stream it will arrive on.

        Encoding (chat template, image preprocessing) runs here, on the caller's thread, so
        the engine thread spends its time in the model.
        """
        stream = ReplyStream()
        key = self._cache_key(conversation, params)
        cached = self.reply_cache.get(key) if key else None
        if cached is not None:
            stream.thinking, stream.prompt_tokens = cached.thinking, cached.prompt_tokens
            stream.append(cached.text)
            stream.finish(ReplyStats(tokens=cached.tokens, seconds=time.perf_counter() - stream.submitted_at,
                                     batch_size=0, peak_memory_mb=None,
                                     finish_reason=FinishReason.STOP, from_cache=True))
            return stream
        prompt, params = self._fit_context(conversation, params, stream)
        if prompt is None:
            return stream
        self._restart_if_dead()
        stream.thinking, stream.prompt_tokens = prompt.thinking, prompt.length
        # Under ZeroGPU the GPU call decodes on its own: a forced token could not reach the model.
        budget = None if self.batch_call else budget_for(self.runner.reasoning_tags, self.max_thinking_tokens,
                                                         params.max_new_tokens, prompt.thinking)
        row = _Row(stream=stream, prompt=prompt, params=params, reasoning=budget,
                   decoder=IncrementalDecoder(self.runner.tokenizer, self._token_texts), cache_key=key)
        with self._wake:
            self._waiting.append(row)
            self._wake.notify()
        return stream

    def _fit_context(self, conversation: Conversation, params: SamplingParams, stream: ReplyStream):
        """Leave out the oldest exchanges until the chat fits the model's context, and say so."""
        try:
            fitted = fit_to_context(self.runner, conversation, params.max_new_tokens, self.context_length)
        except ContextError as exc:
            stream.fail(str(exc))
            return None, params
        dropped = fitted.dropped_exchanges
        if dropped:
            stream.notices.append(f"The chat was too long for the model: the oldest {dropped} "
                                  f"exchange{'s' if dropped > 1 else ''} left out.")
        return fitted.prompt, replace(params, max_new_tokens=fitted.max_new_tokens)

    @property
    def reads_video(self) -> bool:
        """Whether the model takes videos (the legacy 2.5 / 2.6 ones do not)."""
        return self.runner.reads_video

    @property
    def active_rows(self) -> int:
        """Requests generating right now (a cheap read, safe from any thread)."""
        return len(self._rows)

    def state(self) -> EngineState:
        """A cheap snapshot for status panels: never waits for the engine thread."""
        return EngineState(alive=self.alive, queue_depth=len(self._waiting) + bool(self._piecewise),  # a prompt
                           batch_size=self.active_rows, batch_ceiling=self.ceiling,  # in pieces waits too
                           max_batch=self.max_batch, tokens_per_s=self.meter.per_second(),
                           cache_hits=self.reply_cache.hits, restarts=self.restarts)

    def _cache_key(self, conversation: Conversation, params: SamplingParams) -> str | None:
        if not params.greedy or self.reply_cache.capacity <= 0:
            return None
        return f"{conversation.digest()}:{params.max_new_tokens}:{params.repetition_penalty}"

    # -- the engine thread -------------------------------------------------------------------
    def _run(self) -> None:
        """Serve until shutdown; an unexpected error fails the batch in hand, never the engine."""
        while not self._stopping:
            try:
                self._serve()
            except Exception:  # noqa: BLE001 - the loop must outlive any one batch
                log.exception("engine loop failed; failing the current batch and carrying on")
                self.restarts += 1
                self._fail_all("The model failed while answering. Please try again.")

    def _serve(self) -> None:
        while not self._stopping:
            with self._wake:
                while not self._rows and not self._waiting and not self._piecewise and not self._stopping:
                    self._wake.wait()
            self._drop_cancelled_waiting()
            if self.batch_call is not None:
                self._serve_in_one_call()
            elif self.runner.supports_batching:
                self._admit()
                self._advance_piecewise()
                if self._rows:
                    self._step()
            else:
                self._serve_one_serially()

    def _drop_cancelled_waiting(self) -> None:
        """End waiting requests whose clients left, without waiting for a free slot: their
        place in the line (and in the API's count of requests) goes to others now."""
        with self._lock:
            if not any(row.stream.cancelled for row in self._waiting):
                return
            cancelled = [row for row in self._waiting if row.stream.cancelled]
            self._waiting = deque(row for row in self._waiting if not row.stream.cancelled)
        for row in cancelled:
            self._finish(row, FinishReason.CANCELLED)

    def _next_waiting(self) -> _Row | None:
        with self._lock:
            while self._waiting:
                row = self._waiting.popleft()
                if not row.stream.cancelled:
                    return row
                self._finish(row, FinishReason.CANCELLED)
            return None

    def _admit(self) -> None:
        """Prefill the requests that are waiting, together, into the free batch slots."""
        newcomers = self._take_newcomers()
        if not newcomers:
            return
        try:
            prefilled = self._prefill(newcomers)
        except Exception as exc:  # noqa: BLE001 - one bad request must not stop the others
            self._on_prefill_error(newcomers, exc)
            return
        # Outside the try: rows already merged into the batch must never be prefilled again.
        self._add_rows(newcomers, *prefilled)

    def _take_newcomers(self) -> list[_Row]:
        """Waiting rows for the free slots, while their memory and the prefill budget allow."""
        newcomers: list[_Row] = []
        width = 0  # the longest newcomer: every row of the prefill is padded to it
        while len(self._rows) + len(newcomers) + bool(self._piecewise) < self.ceiling:
            row = self._next_waiting()
            if row is None:
                break
            row.reserved_bytes = self._reservation(row)
            row_width = max(width, row.prompt.length + len(row.generated))
            crowded = self._rows or newcomers
            if crowded and row.prompt.length + len(row.generated) > PREFILL_PIECE_TOKENS \
                    and hasattr(self.runner, "begin_prefill"):
                if self._piecewise is not None or not self._fits(row.reserved_bytes, newcomers):
                    self._requeue_front([row])
                    break
                self._piecewise = (row, self.runner.begin_prefill(row.prompt, row.generated))
                continue
            if crowded and (not self._fits(row.reserved_bytes, newcomers)
                            or row_width * (len(newcomers) + 1) > PREFILL_TOKEN_BUDGET):
                self._requeue_front([row])
                break
            width = row_width
            newcomers.append(row)
        return newcomers

    def _prefill(self, newcomers: list[_Row]) -> tuple[object, torch.Tensor]:
        now = time.perf_counter()
        for row in newcomers:
            row.started_at = row.started_at or now
        return self.runner.prefill([r.prompt for r in newcomers], [r.generated for r in newcomers])

    def _advance_piecewise(self) -> None:
        """Prefill the next piece of the long prompt in hand; it joins the batch after its last."""
        if self._piecewise is None:
            return
        row, partial = self._piecewise
        if row.stream.cancelled:
            self._piecewise = None
            self._finish(row, FinishReason.CANCELLED)
            return
        row.started_at = row.started_at or time.perf_counter()
        try:
            done = self.runner.prefill_some(partial, PREFILL_PIECE_TOKENS)
            if done is not None:
                self._piecewise = None
                self._add_rows([row], *done)
        except Exception as exc:  # noqa: BLE001 - handled as any prefill of one request
            self._piecewise = None
            self._on_prefill_error([row], exc)

    def _add_rows(self, newcomers: list[_Row], batch, logits: torch.Tensor) -> None:
        """Prefilled rows join the running batch with their first token."""
        self._batch = self.runner.merge(self._batch, batch)
        self._rows.extend(newcomers)
        self._take_tokens(newcomers, logits)
        self._mark_batch_size()
        self._release_finished()

    def _step(self) -> None:
        tokens = torch.tensor([row.generated[-1] for row in self._rows])
        try:
            logits = self.runner.step(self._batch, tokens)
        except Exception as exc:  # noqa: BLE001
            if not _is_out_of_memory(exc):
                raise
            self._on_step_out_of_memory()
            return
        self._steps_since_oom += 1
        if self._steps_since_oom >= STEPS_TO_RECOVER_CEILING and self.ceiling < self.max_batch:
            self.ceiling += 1
            self._steps_since_oom = 0
        self._take_tokens(self._rows, logits)
        self._release_finished()

    def _serve_one_serially(self) -> None:
        """Runners without batching (legacy remote-code `chat()` models): one request at a time."""
        row = self._next_waiting()
        if row is None:
            return
        row.started_at = time.perf_counter()
        self._rows = [row]
        try:
            for piece in self.runner.stream(row.prompt, row.params, lambda: row.stream.cancelled):
                row.generated.append(0)  # chat() yields text pieces, not ids: count them as tokens
                row.stream.append(piece)
                self.meter.count(1)
            reason = FinishReason.CANCELLED if row.stream.cancelled else FinishReason.STOP
            self._finish(row, reason)
        except Exception as exc:  # noqa: BLE001
            self._fail(row, _user_message(exc))
        finally:
            self._rows = []
            self._after_idle()

    def _serve_in_one_call(self) -> None:
        """ZeroGPU: the requests waiting now are prefilled and decoded together in one GPU call."""
        rows = []
        while len(rows) < self.max_batch and (row := self._next_waiting()) is not None:
            rows.append(row)
        if not rows:
            return
        started = time.perf_counter()
        for row in rows:
            row.started_at, row.largest_batch = started, len(rows)
        self._rows = rows
        self._seed += 1  # each call samples afresh
        events = self.batch_call(self.runner, [r.prompt for r in rows], [r.params for r in rows], self._seed,
                                 self.runner.stop_token_ids)
        peak = None
        try:
            for event in events:
                if isinstance(event, dict):
                    peak = event.get("peak_memory_mb")
                    continue
                given = [(rows[index], token) for index, token in event
                         if rows[index].finish_reason is None and not rows[index].stream.cancelled]
                for row, token in given:
                    self._give(row, token)
                self.meter.count(sum(token is not None for _, token in given))
        except Exception as exc:  # noqa: BLE001 - the call's rows fail, the engine goes on
            log.warning("GPU call failed: %r", exc)
            for row in rows:
                if row.finish_reason is None:
                    self._fail(row, _user_message(exc))
        finally:
            getattr(events, "close", lambda: None)()
            self._rows = []
        for row in rows:
            if row.finish_reason != FinishReason.ERROR:
                reason = FinishReason.CANCELLED if row.stream.cancelled else row.finish_reason or FinishReason.LENGTH
                self._finish(row, reason, peak)

    # -- per-token bookkeeping -----------------------------------------------------------------
    def _take_tokens(self, rows: list[_Row], logits: torch.Tensor) -> None:
        """Give each row its sampled token; a row that cannot go on fails alone.

        Whatever goes wrong for one row (unusable logits, a token its decoder cannot take)
        ends that row with a message; the other rows' tokens of this step stand.
        """
        if self._generator is None or self._generator.device != logits.device:
            self._generator = torch.Generator(device=logits.device).manual_seed(self._seed)
        sampled = sample_for(logits, [r.params for r in rows], self._generator, self._seen_tokens(rows, logits))
        for row, token in zip(rows, sampled.tokens, strict=True):
            self._give(row, token)
        self.meter.count(len(rows) - len(sampled.failed_rows))  # once per step, not per row

    def _seen_tokens(self, rows: list[_Row], logits: torch.Tensor) -> torch.Tensor | None:
        """What each row has seen so far, for the repetition penalty; None when no row has one."""
        if all(row.params.repetition_penalty == 1.0 for row in rows):
            return None
        return self._seen.lookup([(row, row.prompt.ids, row.generated) if row.params.repetition_penalty != 1.0
                                  else None for row in rows], logits)

    def _give(self, row: _Row, token: int | None) -> None:
        """One row's token of a step (None: its logits were unusable); its faults stay its own."""
        if token is None:
            log.warning("a row's logits were not usable (NaN or inf); failing that request alone")
            self._fail(row, INVALID_OUTPUT_MESSAGE)
            return
        try:
            self._accept(row, token)
        except Exception:  # noqa: BLE001 - one row's fault must not end the others
            log.exception("a row failed while taking its token; failing that request alone")
            self._fail(row, "The model could not answer this request. Please try again.")

    def _accept(self, row: _Row, token: int) -> None:
        """Hand `token` to `row`; a stop token ends the row without counting as generated text.

        (The step's tokens are counted for the meter once per step by the caller.)
        """
        if row.reasoning is not None:  # before the stop check: a spent budget closes, never ends, the reasoning
            token, notice = row.reasoning.steer(token)
            if notice:
                row.stream.notices.append(notice)
        if token in self.runner.stop_token_ids:
            row.finish_reason = FinishReason.STOP
            return
        row.generated.append(token)
        row.stream.append(row.decoder.push(token))
        if len(row.generated) >= row.params.max_new_tokens:
            row.finish_reason = FinishReason.LENGTH

    def _mark_batch_size(self) -> None:
        for row in self._rows:
            row.largest_batch = max(row.largest_batch, len(self._rows))

    def _release_finished(self) -> None:
        """Let finished and cancelled rows leave the batch; each hole takes the last row.

        Rows leave the batch before their replies end: whoever waits on an ending reply (the
        admission gate hands its place to the next request) finds the batch without it.
        """
        alive = []
        for index, row in enumerate(self._rows):
            if row.finish_reason is None and row.stream.cancelled:
                row.finish_reason = FinishReason.CANCELLED
            if row.finish_reason is None:
                alive.append(index)
        if len(alive) == len(self._rows):
            return
        keep = fill_holes(alive)
        leaving = [row for row in self._rows if row.finish_reason is not None]
        self._batch = self.runner.select(self._batch, keep)
        self._rows = [self._rows[i] for i in keep]
        for row in leaving:
            if row.finish_reason != FinishReason.ERROR:  # a failed row's stream has ended already
                self._finish(row, row.finish_reason)
        if not self._rows:
            self._after_idle()

    def _finish(self, row: _Row, reason: FinishReason, peak_mb: float | None = None) -> None:
        self._seen.release(row)
        seconds = time.perf_counter() - row.started_at if row.started_at else 0.0
        peak = peak_mb if peak_mb is not None else peak_memory_mb()
        row.stream.finish(ReplyStats(tokens=len(row.generated), seconds=seconds, batch_size=row.largest_batch,
                                     peak_memory_mb=peak, finish_reason=reason))
        if row.cache_key and reason in (FinishReason.STOP, FinishReason.LENGTH):
            self.reply_cache.put(row.cache_key, _CachedReply(row.stream.text, row.stream.thinking,
                                                             row.stream.prompt_tokens, len(row.generated)))

    def _fail(self, row: _Row, message: str) -> None:
        """End `row` with a message for its user; it leaves the batch at the next release."""
        row.finish_reason = FinishReason.ERROR
        self._seen.release(row)
        row.stream.fail(message)

    def _fail_all(self, message: str) -> None:
        piecewise = [self._piecewise[0]] if self._piecewise else []
        for row in [*self._rows, *piecewise]:
            self._fail(row, message)
        self._rows, self._batch, self._piecewise = [], self._emptied_batch(), None
        self._after_idle()

    def _emptied_batch(self):
        """No rows left: preallocated slots are cleared and kept (their captured graphs too)."""
        empty = getattr(self.runner, "empty", None)
        return empty(self._batch) if empty is not None else None

    def _after_idle(self) -> None:
        """The batch emptied: start the next batch's peak-memory measurement afresh."""
        reset_peak_memory()

    # -- memory ----------------------------------------------------------------------------------
    def _reservation(self, row: _Row) -> int:
        estimate = getattr(self.runner, "cache_bytes", None)
        if estimate is None:
            return 0
        return estimate(row.prompt.length + row.params.max_new_tokens)

    def _fits(self, extra_bytes: int, newcomers: list[_Row]) -> bool:
        if self.memory_budget_bytes is None:
            return True
        piecewise = [self._piecewise[0]] if self._piecewise else []
        used = sum(row.reserved_bytes for row in (*self._rows, *newcomers, *piecewise))
        return used + extra_bytes <= self.memory_budget_bytes

    def _requeue_front(self, rows: list[_Row]) -> None:
        with self._lock:
            self._waiting.extendleft(reversed(rows))

    def _on_prefill_error(self, newcomers: list[_Row], exc: Exception) -> None:
        _free_memory()
        if _is_out_of_memory(exc) and (self._rows or len(newcomers) > 1):
            # Too much at once: admit fewer (and wait for running rows to finish first).
            self.ceiling = max(1, len(self._rows) + len(newcomers) // 2)
            self._steps_since_oom = 0
            self._requeue_front(newcomers)
            log.warning("out of memory admitting %d request(s); batch ceiling now %d", len(newcomers),
                        self.ceiling)
            return
        if len(newcomers) > 1:
            # Find the request that broke the prefill: each alone, the others still get served.
            for row in newcomers:
                try:
                    prefilled = self._prefill([row])
                except Exception as solo_exc:  # noqa: BLE001
                    self._on_prefill_error([row], solo_exc)
                    continue
                self._add_rows([row], *prefilled)
            return
        log.warning("request failed in prefill: %r", exc)
        self._fail(newcomers[0], _user_message(exc))

    def _on_step_out_of_memory(self) -> None:
        """Halve the batch ceiling and re-admit every row from its text so far.

        A step that ran out of memory may have updated some layers' caches and not others, so
        no row's cache is trusted: each row is re-prefilled from its prompt plus the tokens it
        already streamed, which continues it exactly where it was.
        """
        rows, self._rows, self._batch = self._rows, [], self._emptied_batch()
        _free_memory()
        if len(rows) == 1:
            self._fail(rows[0], TOO_LARGE_MESSAGE)
            self._after_idle()
            return
        self.ceiling = max(1, len(rows) // 2)
        self._steps_since_oom = 0
        self._requeue_front(rows)
        log.warning("out of memory in a batch of %d: re-admitting them; batch ceiling now %d",
                    len(rows), self.ceiling)


INVALID_OUTPUT_MESSAGE = ("The model produced invalid numbers for this request, so it was stopped. "
                          "Please try again, perhaps with a lower temperature.")
TOO_LARGE_MESSAGE = ("This request does not fit in the GPU memory, even alone. Try fewer or smaller "
                     "images, a shorter chat, or fewer new tokens.")


def _is_out_of_memory(exc: BaseException) -> bool:
    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()


def _user_message(exc: BaseException) -> str:
    if _is_out_of_memory(exc):
        return TOO_LARGE_MESSAGE
    return f"The model could not answer this request ({type(exc).__name__}). Please try again."


def _free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
