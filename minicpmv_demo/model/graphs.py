"""Captured decode steps: one CUDA graph per batch bucket, replayed instead of launched op by op.

A decode step of MiniCPM-V 4.6 is thousands of small kernels; launched one by one from Python,
the GPU idles between them (a 1.3 B model ran at 20 tokens/s on an H100). A CUDA graph records
the step once and replays all its kernels with one call. A graph has fixed shapes and fixed
memory addresses, so it reads the preallocated slots (slot_cache.py) and static input tensors:
the step for `n` rows runs the graph of the smallest bucket (1, 2, 4, ... up to --max-batch)
that holds them, with the spare rows fed a dummy token into free slots (whose length is 0, so
they touch only column 0, which a newcomer overwrites), and attends over a fixed number of
columns. Rows longer than that take the eager step.

Captured at start-up on CUDA only. The CPU, ZeroGPU (no state survives a GPU call there) and
`--enforce-eager` run eager; a capture that fails logs one line and runs eager too: a user must
never get an error from this optimisation.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import torch

from .slot_cache import SlotCache

log = logging.getLogger(__name__)

# Columns a captured step attends over (each row masks what it has not written). A graph has
# one width; attending over all of a long --max-model-len would read every slot's whole buffer
# each step, so longer rows step eager. 4096 covers an image chat of several turns.
GRAPH_MAX_WIDTH = 4096
# Eager runs before capture: the first calls allocate workspaces and pick kernels, which a
# graph must not record.
WARMUP_STEPS = 2

# Records `step` once; returns (replay, the output tensor every replay rewrites).
Recorder = Callable[[Callable[[], torch.Tensor]], tuple[Callable[[], None], torch.Tensor]]


def batch_buckets(max_batch: int) -> list[int]:
    """1, 2, 4, ... below `max_batch`, then `max_batch` itself: a step pads to at most ~2x rows."""
    buckets, size = [], 1
    while size < max_batch:
        buckets.append(size)
        size *= 2
    return [*buckets, max_batch]


def bucket_for(size: int, buckets: list[int]) -> int | None:
    """The smallest bucket that holds `size` rows; None past the largest."""
    return next((bucket for bucket in buckets if bucket >= size), None)


class DecodeGraphs:
    """One recorded decode step per bucket, sharing static input ids and the slot cache."""

    def __init__(self, tokens: torch.Tensor, width: int, replays: dict[int, tuple[Callable[[], None],
                                                                                   torch.Tensor]]) -> None:
        self.tokens, self.width, self.replays = tokens, width, replays
        self.buckets = sorted(replays)

    def fits(self, size: int, width: int) -> bool:
        return width <= self.width and bucket_for(size, self.buckets) is not None

    def run(self, tokens: torch.Tensor, size: int) -> torch.Tensor:
        """Next-token logits of the first `size` slots, fed `tokens` [size]."""
        bucket = bucket_for(size, self.buckets)
        self.tokens[:size].copy_(tokens, non_blocking=True)
        self.tokens[size:bucket].zero_()
        replay, logits = self.replays[bucket]
        replay()
        return logits[:size].clone()  # the next replay overwrites the static output


def capture_decode_graphs(runner, cache: SlotCache) -> DecodeGraphs | None:
    """Graphs for every bucket up to the cache's slots on CUDA; None (eager) anywhere else."""
    if cache.lengths.device.type != "cuda":
        log.info("decode steps run eager on %s", cache.lengths.device.type)
        return None
    pool = torch.cuda.graph_pool_handle()
    return build_graphs(runner, cache, lambda step: _cuda_record(step, pool))


def build_graphs(runner, cache: SlotCache, record: Recorder) -> DecodeGraphs | None:
    """Record `runner.decode_slots` for each bucket with `record`; None (eager) if that fails.

    Buckets are recorded largest first (on CUDA they share one memory pool, which the largest
    sizes). The slots are empty at start-up; what recording wrote into them is cleared.
    """
    buckets = batch_buckets(cache.slots)
    width = min(cache.max_len, GRAPH_MAX_WIDTH)
    tokens = torch.zeros(cache.slots, dtype=torch.long, device=cache.lengths.device)
    started = time.perf_counter()
    log.info("capturing decode steps for batch sizes %s (%d columns)...", buckets, width)
    replays = {}
    try:
        for bucket in reversed(buckets):
            replays[bucket] = record(lambda b=bucket: runner.decode_slots(cache, tokens[:b], b, width))
    except Exception as exc:  # noqa: BLE001 - any capture problem means eager, never a crash
        log.warning("decode step capture failed, running eager: %s: %s", type(exc).__name__, exc)
        return None
    finally:
        for slot in range(cache.slots):
            cache.free(slot, 0)
    log.info("captured %d decode steps in %.1f s", len(replays), time.perf_counter() - started)
    return DecodeGraphs(tokens, width, replays)


def _cuda_record(step: Callable[[], torch.Tensor], pool) -> tuple[Callable[[], None], torch.Tensor]:
    """Warm `step` on a side stream, then capture it into a CUDA graph in `pool`.

    The buckets share one pool: only one replays at a time and its output is copied out at once.
    """
    with torch.inference_mode():
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(WARMUP_STEPS):
                step()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        # thread_local: CUDA calls of other threads (the status panel's memory reads) must not
        # invalidate the capture, nor be refused because of it.
        with torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"):
            output = step()
    return graph.replay, output
