"""Every call the GPU check makes into the engine's slots, captured graphs, memory and start-up.

What the check needs from them is read here and nowhere else: a change to those parts of
`minicpmv_demo` is adjusted in one file. Each function says which attribute it relies on.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, is_dataclass
from typing import Any

import torch

# The first width bucket when the graphs do not list theirs (main's plan: 256, 1024, 4096, ...).
DEFAULT_FIRST_WIDTH = 256
# Loggers whose records count as the engine's own start-up lines.
PACKAGE_LOGGER = "minicpmv_demo"


# -- slots and captured graphs ---------------------------------------------------------------
def new_slots(runner, slots: int, max_len: int, capture: bool):
    """`runner.new_slots(slots, max_len, capture=...)`: a SlotBatch, `.graphs` None when eager."""
    return runner.new_slots(slots, max_len, capture=capture)


def attach_stand_in_graphs(runner, batch) -> None:
    """On a CPU, give `batch` graphs whose 'replay' runs the recorded step again (what
    tests/model/test_slots.py does): the bucket choice, the padding and the static buffers are
    the real ones, CUDA's capture is not. Lets `--reduced` run the comparison machinery."""
    batch.graphs = build_graphs_with(runner, batch, eager_recorder)


def build_graphs_with(runner, batch, record: Callable):
    """`model.graphs.build_graphs(runner, cache, record)` with a custom recorder."""
    from minicpmv_demo.model.graphs import build_graphs

    return build_graphs(runner, batch.cache, record)


def eager_recorder(step: Callable[[], torch.Tensor]) -> tuple[Callable[[], None], torch.Tensor]:
    """Record by running `step` once; each replay runs it again into the same output."""
    output = step()

    def replay() -> None:
        output.copy_(step())

    return replay, output


def graph_outputs(graphs) -> dict[Any, tuple[Callable[[], None], torch.Tensor]]:
    """Each captured graph's (replay, static output), keyed as the graphs key them
    (`graphs.replays`: batch bucket today, (batch bucket, width) in main's plan)."""
    return dict(getattr(graphs, "replays", {}) or {})


def graph_widths(graphs) -> list[int]:
    """The widths (columns attended) the graphs were captured at: `graphs.widths` in main's plan,
    `graphs.width` (one) before it."""
    widths = getattr(graphs, "widths", None)
    if widths:
        return sorted(int(w) for w in widths)
    width = getattr(graphs, "width", None)
    return [int(width)] if width else []


def first_width(graphs) -> int:
    """The first length bucket: the smallest of `graphs.widths`; 256 (main's first bucket) where
    the graphs do not list theirs (one width before main's plan, which is no bucket)."""
    widths = getattr(graphs, "widths", None)
    return min(int(w) for w in widths) if widths else DEFAULT_FIRST_WIDTH


def graph_buckets(graphs) -> list[int]:
    """The batch buckets the graphs were captured for (`graphs.buckets`)."""
    return list(getattr(graphs, "buckets", []) or [])


@contextmanager
def counting_replays(graphs) -> Iterator[list[int]]:
    """Count the decode steps that went through a captured graph (calls of `graphs.run`)."""
    calls = [0]
    original = graphs.run

    def run(*args, **kwargs):
        calls[0] += 1
        return original(*args, **kwargs)

    graphs.run = run
    try:
        yield calls
    finally:
        del graphs.run  # the instance attribute goes; the class's method is back


# -- the engine ------------------------------------------------------------------------------
def start_engine(runner, *, max_batch: int, max_model_len: int, enforce_eager: bool, utilization: float = 0.9):
    """`Engine(runner, ...)` started as the app starts it (`--gpu-memory-utilization`), with the
    reply cache off (a benchmark repeats its chats)."""
    from minicpmv_demo.engine import Engine

    return Engine(runner, max_batch=max_batch, cache_size=0, gpu_memory_utilization=utilization,
                  max_model_len=max_model_len, enforce_eager=enforce_eager).start()


def engine_graphs(engine):
    """The engine's captured graphs, None when it runs eager (`engine._batch.graphs`)."""
    return getattr(getattr(engine, "_batch", None), "graphs", None)


def engine_slot_length(engine) -> int:
    """Tokens one slot holds (`engine.context_length`)."""
    return int(engine.context_length)


def engine_memory_budget(engine) -> int | None:
    """The bytes a prefill may take now, as the engine measures them at each admission."""
    return engine.free_for_prefills()


def engine_state(engine) -> dict:
    """`engine.state()` as a dict (an `EngineState` dataclass)."""
    state = engine.state()
    return asdict(state) if is_dataclass(state) else dict(vars(state))


def slot_bytes(runner, slots: int, max_len: int) -> int:
    """What `slots` slots of `max_len` tokens take."""
    return int(runner.slot_bytes(slots, max_len))


def memory_budget(runner, utilization: float = 0.9) -> int | None:
    """What the engine may still fill on the model's GPUs under `utilization` (slots and prefills),
    measured as it measures it; None on a CPU."""
    from minicpmv_demo.system.gpu import usable_bytes

    return usable_bytes(runner.devices, utilization)


def model_devices(runner) -> list[torch.device]:
    """The devices holding the model's parameters (several with --device-map auto on 2 GPUs)."""
    return sorted({p.device for p in runner.model.parameters()}, key=str)


def graph_pool_bytes() -> int | None:
    """Bytes held by private memory pools (CUDA graphs' pools) on every GPU; None on a CPU."""
    if not torch.cuda.is_available():
        return None
    segments = torch.cuda.memory_snapshot()
    return sum(int(s["total_size"]) for s in segments if tuple(s.get("segment_pool_id", (0, 0))) != (0, 0))


# -- int8 ------------------------------------------------------------------------------------
def is_int8_eager_line(record: logging.LogRecord) -> bool:
    """A start-up line saying int8 runs eager (the integrator's decision for issue 21)."""
    text = record.getMessage().lower()
    return "int8" in text and "eager" in text


def is_capture_failure_line(record: logging.LogRecord) -> bool:
    """`model/graphs.py`'s warning when a capture failed and the engine fell back to eager."""
    return "capture failed" in record.getMessage().lower()


class RecordingHandler(logging.Handler):
    """Keeps every record it sees (the check reads the engine's start-up lines from them)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@contextmanager
def recording_logs(name: str = "", level: int = logging.INFO) -> Iterator[RecordingHandler]:
    """Record what logger `name` (root: everything) emits at `level` or above while inside."""
    logger = logging.getLogger(name)
    handler, previous = RecordingHandler(), logger.level
    logger.addHandler(handler)
    logger.setLevel(min(previous or logging.WARNING, level))
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(previous)
