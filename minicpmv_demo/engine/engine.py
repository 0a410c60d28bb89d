"""The engine: one thread owns the model; every request is a row in its running batch.

Gradio handlers call `submit()` and read the returned `ReplyStream`; they never touch the model.
The engine thread loops: let the scheduler admit waiting requests (prefilled together and merged
into the batch), run one decode step for all rows, hand each row its token, and let finished or
cancelled rows leave. A request that arrives mid-generation therefore starts at the next step
instead of waiting for the others' long answers, and no two threads are ever inside the model
(which bitsandbytes int4 and `generate()` do not survive).

Who runs next is the scheduler's (scheduler.py); what a running request holds and how it takes
its tokens is the sequence's (sequence.py); the GPU work is the runner's (model/runner.py).

Out of memory in a step halves the batch ceiling for a while and re-admits the rows from their
text so far (the older half first); a request that cannot fit even alone gets a clear error.
Any other failure fails only the requests in that batch; the loop goes on (recovery.py).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

import torch

from ..intake.conversation import Conversation
from ..model.runner import BatchRunner
from ..system.gpu import peak_memory_mb, reset_peak_memory, usable_bytes
from .context import fit_for_stream
from .contract import EngineState
from .detokenizer import IncrementalDecoder
from .failures import GPU_FAILED_MESSAGE, attempt, free_memory
from .meter import TokenMeter
from .one_call import BatchCall, serve_in_one_call
from .reasoning_budget import budget_for
from .recovery import Recovery
from .reply_cache import ReplyCache
from .request import FinishReason, ReplyStream, SamplingParams
from .sampling import RowSampler, Sampled
from .scheduler import PREFILL_PIECE_TOKENS, Scheduler
from .sequence import Sequence
from .slots import fill_holes
from .start import allocate_slots

log = logging.getLogger(__name__)


class Engine(Recovery):
    """Owns a model runner on one thread and serves every request through it."""

    def __init__(self, runner: BatchRunner, *, max_batch: int = 8, cache_size: int = 128,
                 gpu_memory_utilization: float = 0.9, headroom: Callable[[], int | None] | None = None,
                 seed: int = 0, batch_call: BatchCall | None = None, max_thinking_tokens: int = 0,
                 max_model_len: int = 0, enforce_eager: bool = False,
                 on_fatal: Callable[[str], None] | None = None) -> None:
        """`batch_call` (ZeroGPU only, see one_call.py) runs each batch to the end in one GPU call.
        `max_thinking_tokens`: each reply's reasoning budget (0 = no cap; the app passes
        --max-thinking-tokens), see reasoning_budget.py.

        The runner gets `max_batch` preallocated slots of `max_model_len` tokens (0: sized
        from the GPU memory free under `gpu_memory_utilization`), and, unless `enforce_eager`,
        captured decode steps where the device allows; ZeroGPU keeps no state between calls, so
        no slots. A prefill is admitted when its memory fits `headroom()` (default: measured on the
        model's GPUs at each admission, less what the runner may still take; nothing on the CPU).
        `on_fatal(reason)` is called when the device broke for good (the server exits for a restart).
        """
        self.runner = runner
        self.max_thinking_tokens = max_thinking_tokens
        self.batch_call = batch_call
        self.max_batch = max_batch
        self.enforce_eager = enforce_eager
        self._use_slots = batch_call is None
        self._utilization = gpu_memory_utilization
        self.context_length = (self.runner.slot_length(self.max_batch, max_model_len, self._usable_bytes())
                               if self._use_slots else runner.context_length)
        self.scheduler = Scheduler(self.max_batch, runner.prefill_bytes if self._use_slots else None,
                                   headroom or self.free_for_prefills,
                                   on_cancelled=lambda sequence: self.finish(sequence, FinishReason.CANCELLED))
        self.reply_cache = ReplyCache(cache_size)  # greedy replies by chat and settings
        self._token_texts: dict[int, str] = {}  # each token's text alone, for the rows' decoders
        self.seed = seed  # ZeroGPU's calls each sample afresh from the next seed
        self.sampler = RowSampler(seed)
        self.running: list[Sequence] = []  # the batch, row i in slot i
        self._batch = None
        self._piecewise: tuple[Sequence, object] | None = None  # a long prompt being prefilled in pieces
        self.meter = TokenMeter()  # tokens/s over the last seconds, for status panels
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._restart_lock = threading.Lock()
        self.restarts = 0
        self.on_fatal = on_fatal
        self.fatal: str | None = None  # why the engine stopped for good (a broken device)

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self) -> Engine:
        """Preallocate the slots (and capture decode steps), then start the engine thread.
        Raises EngineStartError (one line saying what to lower) when the slots do not fit."""
        if self._use_slots and self._batch is None:
            self._batch = allocate_slots(self.runner, self.max_batch, self.context_length,
                                         capture=not self.enforce_eager, usable=self._usable_bytes())
            room = self.free_for_prefills()
            if room is not None:
                log.info("after slots and captured steps, %.0f MB are free for prefills", room / 2**20)
        self._thread = threading.Thread(target=self._run, name="minicpmv-engine", daemon=True)
        self._thread.start()
        return self

    def shutdown(self, timeout: float = 10.0) -> None:
        self._stopping = True
        self.scheduler.wake()
        if self._thread is not None:
            self._thread.join(timeout)

    def _restart_if_dead(self) -> None:
        """The loop survives model errors by itself; this covers anything that still kills it."""
        with self._restart_lock:  # several handlers may notice at once; one restart is enough
            if self._thread is not None and not self._thread.is_alive() and not self._stopping and not self.fatal:
                log.error("engine thread was dead; starting a new one")
                self.restarts += 1
                self._fail_all("The model engine restarted; please try again.")
                self.start()

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _usable_bytes(self) -> int | None:
        """GPU memory this process may still fill on the model's devices; None on the CPU."""
        if not self._use_slots:
            return None
        free_memory()
        return usable_bytes(self.runner.devices, self._utilization)

    def free_for_prefills(self) -> int | None:
        """What a prefill may take now: the usable memory less what the runner may still take."""
        usable = usable_bytes(self.runner.devices, self._utilization) if self._use_slots else None
        return None if usable is None else usable - self.runner.working_bytes(self.max_batch)

    # -- the handlers' side ------------------------------------------------------------------
    def submit(self, conversation: Conversation, params: SamplingParams) -> ReplyStream:
        """Queue a reply to `conversation`; returns at once with the stream it will arrive on.

        Encoding (chat template, image preprocessing) runs here, on the caller's thread, so
        the engine thread spends its time in the model.
        """
        stream = ReplyStream()
        if self.fatal:  # the device broke: nothing can be answered until the process restarts
            stream.fail(GPU_FAILED_MESSAGE)
            return stream
        key = self.reply_cache.key(conversation, params)
        if self.reply_cache.answer(key, stream):
            return stream
        fitted = fit_for_stream(self.runner, conversation, params, self.context_length, stream)
        if fitted is None:
            return stream
        prompt, params = fitted
        self._restart_if_dead()
        stream.thinking, stream.prompt_tokens = prompt.thinking, prompt.length
        # Under ZeroGPU the GPU call decodes on its own: a forced token could not reach the model.
        budget = None if self.batch_call else budget_for(self.runner.reasoning_tags, self.max_thinking_tokens,
                                                         params.max_new_tokens, prompt.thinking)
        self.scheduler.add(Sequence(stream=stream, prompt=prompt, params=params, reasoning=budget, cache_key=key,
                                    decoder=IncrementalDecoder(self.runner.tokenizer, self._token_texts)))
        return stream

    @property
    def reads_video(self) -> bool:
        """Whether the model takes videos (the legacy 2.5 / 2.6 ones do not)."""
        return self.runner.reads_video

    @property
    def active_rows(self) -> int:
        """Requests generating right now (a cheap read, safe from any thread)."""
        return len(self.running)

    def state(self) -> EngineState:
        """A cheap snapshot for status panels: never waits for the engine thread."""
        return EngineState(alive=self.alive, queue_depth=self.scheduler.queue_depth + bool(self._piecewise),
                           batch_size=self.active_rows, batch_ceiling=self.scheduler.ceiling,
                           max_batch=self.max_batch, tokens_per_s=self.meter.per_second(),
                           cache_hits=self.reply_cache.hits, restarts=self.restarts)

    # -- the engine thread -------------------------------------------------------------------
    def _run(self) -> None:
        """Serve until shutdown; an unexpected error fails the batch in hand, never the engine
        (unless the device itself broke: see `_die`)."""
        while not self._stopping:
            _, failure = attempt(self._serve)
            if failure is not None:  # handled here, outside `except`: no traceback pins the batch
                self._on_batch_failure(failure)

    def _serve(self) -> None:
        while not self._stopping:
            self.scheduler.wait(idle=lambda: not self.running and not self._piecewise and not self._stopping)
            self.scheduler.drop_cancelled()
            if self.batch_call is not None:
                serve_in_one_call(self, self.batch_call)
                continue
            self._admit()
            self._advance_piecewise()
            if self.running:
                self._step()

    def _admit(self) -> None:
        """Prefill the requests the scheduler lets in, together, into free batch slots."""
        piecewise = self._piecewise[0] if self._piecewise else None
        admission = self.scheduler.schedule(self.running, piecewise, can_split=True)
        if admission.piecewise is not None:
            admission.piecewise.start()
            self._piecewise = (admission.piecewise, self.runner.begin_prefill(
                admission.piecewise.prompt, admission.piecewise.generated))
        if not admission.newcomers:
            return
        prefilled, failure = attempt(lambda: self._prefill(admission.newcomers))
        if failure is not None:  # one bad request must not stop the others
            self._on_prefill_failure(admission.newcomers, failure)
            return
        # After the attempt: rows already merged into the batch must never be prefilled again.
        self._add_rows(admission.newcomers, *prefilled)

    def _prefill(self, newcomers: list[Sequence]) -> tuple[object, torch.Tensor]:
        now = time.perf_counter()
        for sequence in newcomers:
            sequence.start(now)
        return self.runner.prefill([s.prompt for s in newcomers], [s.generated for s in newcomers])

    def _advance_piecewise(self) -> None:
        """Prefill the next piece of the long prompt in hand; it joins the batch after its last."""
        if self._piecewise is None:
            return
        sequence, partial = self._piecewise
        if sequence.cancelled:
            self._piecewise = None
            self.finish(sequence, FinishReason.CANCELLED)
            return
        done, failure = attempt(lambda: self.runner.prefill_some(partial, PREFILL_PIECE_TOKENS))
        if failure is not None:  # handled as any prefill of one request
            self._piecewise = None
            self._on_prefill_failure([sequence], failure)
        elif done is not None:
            self._piecewise = None
            self._add_rows([sequence], *done)

    def _add_rows(self, newcomers: list[Sequence], batch, logits: torch.Tensor) -> None:
        """Prefilled rows join the running batch with their first token."""
        self._batch = self.runner.merge(self._batch, batch)
        self.running.extend(newcomers)
        for sequence in self.running:
            sequence.largest_batch = max(sequence.largest_batch, len(self.running))
        sampled, failure = attempt(lambda: self.sampler.sample(newcomers, logits))
        if failure is not None:
            self._on_batch_failure(failure)
            return
        self._give_tokens(newcomers, sampled)
        self._release_finished()

    def _step(self) -> None:
        """One decode step for every row, and each row's next token (sampling runs out of memory
        like the step itself: on a full GPU its [B, V] temporaries are the last straw)."""
        tokens = torch.tensor([sequence.generated[-1] for sequence in self.running])
        sampled, failure = attempt(lambda: self.sampler.sample(self.running,
                                                               self.runner.step(self._batch, tokens)))
        if failure is not None:
            self._on_batch_failure(failure)
            return
        self.scheduler.after_step()
        self._give_tokens(self.running, sampled)
        self._release_finished()

    # -- per-token bookkeeping -----------------------------------------------------------------
    def _give_tokens(self, rows: list[Sequence], sampled: Sampled) -> None:
        """Give each row its sampled token; a row that cannot go on fails alone."""
        for sequence, token in zip(rows, sampled.tokens, strict=True):
            self.give(sequence, token)
        self.meter.count(len(rows) - len(sampled.failed_rows))  # once per step, not per row

    def give(self, sequence: Sequence, token: int | None) -> None:
        """One row's token of a step (None: its logits were unusable); its faults stay its own."""
        sequence.take(token, self.runner.stop_token_ids)
        if sequence.stream.done:  # it failed: its penalty history goes now
            self.sampler.release(sequence)

    def _release_finished(self) -> None:
        """Let finished and cancelled rows leave the batch; each hole takes the last row.

        Rows leave the batch before their replies end: whoever waits on an ending reply (the
        admission gate hands its place to the next request) finds the batch without it.
        """
        for sequence in self.running:
            sequence.mark_cancelled()
        alive = [index for index, sequence in enumerate(self.running) if sequence.finish_reason is None]
        if len(alive) == len(self.running):
            return
        keep = fill_holes(alive)
        leaving = [sequence for sequence in self.running if sequence.finish_reason is not None]
        self._batch = self.runner.select(self._batch, keep)
        self.running = [self.running[i] for i in keep]
        for sequence in leaving:
            if sequence.finish_reason != FinishReason.ERROR:  # a failed row's stream has ended already
                self.finish(sequence, sequence.finish_reason)
        if not self.running:
            self.reset_peak()

    def finish(self, sequence: Sequence, reason: FinishReason, peak_mb: float | None = None) -> None:
        """End `sequence`'s reply with its stats; a whole greedy reply goes to the reply cache."""
        self.sampler.release(sequence)
        sequence.finish(reason, peak_mb if peak_mb is not None else peak_memory_mb())
        self.reply_cache.remember(sequence, reason)

    def fail(self, sequence: Sequence, message: str) -> None:
        """End `sequence` with a message for its user; it leaves the batch at the next release."""
        self.sampler.release(sequence)
        sequence.fail(message)

    def reset_peak(self) -> None:
        """The batch emptied: start the next batch's peak-memory measurement afresh."""
        reset_peak_memory()
