"""Preallocating the batch's slots at start-up, with a one-line error when they do not fit.

Asking for more slot memory than the GPU has would otherwise end start-up with a raw out-of-memory
traceback from deep inside torch; here the size is checked first, and a failure (in the slots
or in capturing the decode steps) says what to lower.
"""

from __future__ import annotations

from ..model.runner import BatchRunner
from .failures import free_memory, is_out_of_memory

MB = 2**20


class EngineStartError(RuntimeError):
    """The engine cannot start; str() is one line saying what to change."""


def allocate_slots(runner: BatchRunner, slots: int, max_len: int, capture: bool, usable: int | None):
    """`runner.new_slots(...)`, refused before allocating when the slots alone pass `usable` bytes."""
    needed = runner.slot_bytes(slots, max_len)
    if usable is not None and needed > usable:
        raise EngineStartError(_advice(slots, max_len, needed, usable))
    try:
        return runner.new_slots(slots, max_len, capture=capture)
    except Exception as exc:  # noqa: BLE001 - only running out of memory is turned into advice
        if not is_out_of_memory(exc):
            raise
    free_memory()
    raise EngineStartError(_advice(slots, max_len, needed, usable))


def _advice(slots: int, max_len: int, needed: int, usable: int | None) -> str:
    free = f"{usable / MB:,.0f} MB are free under --gpu-memory-utilization" if usable is not None else "the GPU is full"
    return (f"the KV slots for --max-batch {slots} x --max-model-len {max_len} need {needed / MB:,.0f} MB, but "
            f"{free}: lower --max-model-len or --max-batch (or raise --gpu-memory-utilization)")
