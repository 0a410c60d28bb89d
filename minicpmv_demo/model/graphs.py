"""Captured decode steps: one CUDA graph per (batch bucket, width), replayed instead of launched op
by op.

A decode step of MiniCPM-V 4.6 is thousands of small kernels; launched one by one from Python,
the GPU idles between them (a 1.3 B model ran at 20 tokens/s on an H100). A CUDA graph records
the step once and replays all its kernels with one call. A graph has fixed shapes and fixed
memory addresses, so it reads the preallocated slots (slot_cache.py) and static input tensors.
The step for `n` rows whose longest holds `w` tokens runs the graph of the smallest batch bucket
(1, 2, 4, ... up to --max-batch) that holds the rows and the smallest width (256, 1024, 4096,
... up to the slot length) past `w`: the spare rows are fed a dummy token into free slots (whose
length is 0, so they touch only column 0, which a newcomer overwrites), and every row attends
over that width, masking what it has not written. So a long chat moves the batch to a wider
graph (its attention reads more columns, for every row) but never off the captured path.

Captured at start-up on CUDA only, on the model's device. The CPU, ZeroGPU (no state survives a
GPU call there), `--enforce-eager`, a model spread over several GPUs and int8 (bitsandbytes'
outlier check waits for the GPU inside the step, which a graph cannot record) run eager, said in
one log line; a capture that fails logs one line and runs eager too: a user must never get an
error from this optimisation.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import torch

from .slot_cache import SlotCache

log = logging.getLogger(__name__)

# The narrowest captured width; each next one is WIDTH_GROWTH times wider, up to the slot length.
FIRST_WIDTH = 256
WIDTH_GROWTH = 4
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


def graph_widths(max_len: int) -> list[int]:
    """256, 1024, 4096, ... below `max_len`, then `max_len`: a row of any length has a graph."""
    widths, width = [], FIRST_WIDTH
    while width < max_len:
        widths.append(width)
        width *= WIDTH_GROWTH
    return [*widths, max_len]


def bucket_for(size: int, buckets: list[int]) -> int | None:
    """The smallest bucket that holds `size`; None past the largest."""
    return next((bucket for bucket in buckets if bucket >= size), None)


class DecodeGraphs:
    """One recorded decode step per (batch bucket, width), sharing static input ids and the slots."""

    def __init__(self, tokens: torch.Tensor,
                 replays: dict[tuple[int, int], tuple[Callable[[], None], torch.Tensor]]) -> None:
        self.tokens, self.replays = tokens, replays
        self.buckets = sorted({bucket for bucket, _ in replays})
        self.widths = sorted({width for _, width in replays})

    def fits(self, size: int, width: int) -> bool:
        return bucket_for(size, self.buckets) is not None and bucket_for(width, self.widths) is not None

    def run(self, tokens: torch.Tensor, size: int, width: int) -> torch.Tensor:
        """Next-token logits of the first `size` slots, fed `tokens` [size], attending over at
        least `width` columns."""
        bucket = bucket_for(size, self.buckets)
        self.tokens[:size].copy_(tokens, non_blocking=True)
        self.tokens[size:bucket].zero_()
        replay, logits = self.replays[bucket, bucket_for(width, self.widths)]
        replay()
        return logits[:size].clone()  # the next replay overwrites the static output


def capture_decode_graphs(runner, cache: SlotCache) -> DecodeGraphs | None:
    """Graphs for every (bucket, width) on CUDA; None (eager, said once) where they cannot be."""
    if cache.device.type != "cuda":
        log.info("decode steps run eager on %s", cache.device.type)
        return None
    if cache.spread:
        log.info("the model's layers are on %d devices: decode steps run eager", len(set(cache.layer_devices)))
        return None
    if not runner.capturable:
        log.info("int8 (bitsandbytes) decode steps run eager: its outlier check waits for the GPU inside "
                 "each step, which a captured graph cannot record")
        return None
    with torch.cuda.device(cache.device):
        pool = torch.cuda.graph_pool_handle()
        return build_graphs(runner, cache, lambda step: _cuda_record(step, pool))


def build_graphs(runner, cache: SlotCache, record: Recorder) -> DecodeGraphs | None:
    """Record `runner.decode_slots` for each (bucket, width) with `record`; None (eager) if that fails.

    Recorded widest and largest first (on CUDA they share one memory pool, which the largest
    sizes). The slots are empty at start-up; what recording wrote into them is cleared.
    """
    buckets, widths = batch_buckets(cache.slots), graph_widths(cache.max_len)
    tokens = torch.zeros(cache.slots, dtype=torch.long, device=cache.device)
    started = time.perf_counter()
    log.info("capturing decode steps for batch sizes %s and widths %s...", buckets, widths)
    replays = {}
    try:
        for width in reversed(widths):
            for bucket in reversed(buckets):
                replays[bucket, width] = record(lambda b=bucket, w=width: runner.decode_slots(cache, tokens[:b], b, w))
    except Exception as exc:  # noqa: BLE001 - any capture problem means eager, never a crash
        log.warning("decode step capture failed, running eager: %s: %s", type(exc).__name__, exc)
        return None
    finally:
        for slot in range(cache.slots):
            cache.free(slot, 0)
    log.info("captured %d decode steps in %.1f s", len(replays), time.perf_counter() - started)
    return DecodeGraphs(tokens, replays)


def _cuda_record(step: Callable[[], torch.Tensor], pool) -> tuple[Callable[[], None], torch.Tensor]:
    """Warm `step` on a side stream, then capture it into a CUDA graph in `pool`.

    The graphs share one pool: only one replays at a time and its output is copied out at once.
    A capture that fails puts this thread back on the stream it was on: a failed
    `torch.cuda.graph` can leave it on the capture stream, and every later step would run there.
    """
    previous = torch.cuda.current_stream()
    try:
        with torch.inference_mode():
            stream = torch.cuda.Stream()
            stream.wait_stream(previous)
            with torch.cuda.stream(stream):
                for _ in range(WARMUP_STEPS):
                    step()
            previous.wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            # thread_local: CUDA calls of other threads (the status panel's memory reads) must
            # not invalidate the capture, nor be refused because of it.
            with torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"):
                output = step()
    finally:
        torch.cuda.set_stream(previous)
    if _recorded_nothing(graph, output):
        raise RuntimeError("the captured decode step recorded no work")
    return graph.replay, output


def _recorded_nothing(graph, output: torch.Tensor) -> bool:
    """An empty graph's replays would return stale logits: poison the output and replay once."""
    output.fill_(float("nan"))
    graph.replay()
    torch.cuda.current_stream().synchronize()
    return bool(torch.isnan(output).all())
