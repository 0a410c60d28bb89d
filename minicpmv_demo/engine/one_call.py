"""Serving without state between GPU calls (Hugging Face ZeroGPU, see system/zerogpu.py): the
requests waiting at one moment are prefilled and decoded together to the end in one GPU call,
which yields each step's tokens back to the engine thread; requests that arrive meanwhile form the
next batch. Slots, captured steps and the reasoning budget need state that survives between
steps on the GPU, so none of them is used here.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

import torch

from ..system.gpu import peak_memory_mb, reset_peak_memory
from .failures import user_message
from .request import FinishReason
from .sampling import row_generator, sample_for
from .seen_tokens import SeenTokens

if TYPE_CHECKING:
    from .engine import Engine

log = logging.getLogger(__name__)

# `decode_batch`, or it wrapped in `@spaces.GPU`: (runner, prompts, params, seed, stop ids) -> events.
BatchCall = Callable[..., Iterator[list[tuple[int, int | None]] | dict]]


def serve_in_one_call(engine: Engine, batch_call: BatchCall) -> None:
    """The requests waiting now are prefilled and decoded together in one GPU call."""
    rows = []
    while len(rows) < engine.max_batch and (sequence := engine.scheduler.next_waiting()) is not None:
        rows.append(sequence)
    if not rows:
        return
    started = time.perf_counter()
    for sequence in rows:
        sequence.start(started)
        sequence.largest_batch = len(rows)
    engine.running = rows
    engine.seed += 1  # each call samples afresh
    events = batch_call(engine.runner, [s.prompt for s in rows], [s.params for s in rows], engine.seed,
                        engine.runner.stop_token_ids)
    peak = None
    try:
        for event in events:
            if isinstance(event, dict):
                peak = event.get("peak_memory_mb")
                continue
            given = [(rows[index], token) for index, token in event
                     if rows[index].finish_reason is None and not rows[index].cancelled]
            for sequence, token in given:
                engine.give(sequence, token)
            engine.meter.count(sum(token is not None for _, token in given))
    except Exception as exc:  # noqa: BLE001 - the call's rows fail, the engine goes on
        log.warning("GPU call failed: %r", exc)
        for sequence in rows:
            if sequence.finish_reason is None:
                engine.fail(sequence, user_message(exc))
    finally:
        getattr(events, "close", lambda: None)()
        engine.running = []
    for sequence in rows:
        if sequence.finish_reason != FinishReason.ERROR:
            reason = FinishReason.CANCELLED if sequence.cancelled else sequence.finish_reason or FinishReason.LENGTH
            engine.finish(sequence, reason, peak)


def decode_batch(runner, prompts: list, params: list, seed: int,
                 stop_token_ids: frozenset[int]) -> Iterator[list[tuple[int, int]] | dict]:
    """Prefill `prompts` together and decode them to the end, in one GPU call.

    Yields, per step, `(row, token)` for each row still running (token None: that row's logits
    were unusable, and it ends there), and finally `{"peak_memory_mb": ...}` measured here, where
    CUDA is real. A row ends on a stop token or its own `max_new_tokens`; the engine stops
    reading when every row it still cares about is done.
    """
    reset_peak_memory()
    with torch.inference_mode():
        batch, logits = runner.prefill(prompts, [[] for _ in prompts])
        generator = torch.Generator(device=logits.device).manual_seed(seed)
        own = [None if p.seed is None or p.greedy else row_generator(p.seed, logits.device) for p in params]
        alive = list(range(len(prompts)))
        counts = [0] * len(prompts)
        replies: list[list[int]] = [[] for _ in prompts]  # what a repetition penalty counts
        seen = SeenTokens()
        while alive:
            penalised = [(row, prompts[row].ids, replies[row]) if params[row].repetition_penalty != 1.0 else None
                         for row in alive]
            history = seen.lookup(penalised, logits) if any(penalised) else None
            tokens = sample_for(logits, [params[i] for i in alive], generator, history,
                                [own[i] for i in alive]).tokens
            yield list(zip(alive, tokens, strict=True))
            keep = []
            for position, (row, token) in enumerate(zip(alive, tokens, strict=True)):
                counts[row] += 1
                if token is not None:
                    replies[row].append(token)
                if token is not None and token not in stop_token_ids and counts[row] < params[row].max_new_tokens:
                    keep.append(position)
            if not keep:
                break
            batch = runner.select(batch, keep)
            alive = [alive[p] for p in keep]
            logits = runner.step(batch, torch.tensor([tokens[p] for p in keep]))
    yield {"peak_memory_mb": peak_memory_mb()}
