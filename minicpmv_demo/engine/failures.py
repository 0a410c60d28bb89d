"""What a failed request's user reads, and how the engine tells failures apart.

Out of memory is no fault of a request: the engine answers it by admitting fewer at once
(engine.py); only a request too large even alone is told so. A sticky device error (an illegal
memory access, a device-side assert) breaks the CUDA context for good: every later call fails,
so the engine stops and the process exits for its supervisor (or the Space) to restart it.
A failure is kept as a `Failure` (kind and message), never as the exception: the exception's
traceback pins the failed forward's tensors for as long as it lives.
"""

from __future__ import annotations

import gc
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import torch

# What a CUDA error that poisons the context says (torch raises them as AcceleratorError, older
# releases as RuntimeError).
STICKY_SIGNS = ("illegal memory access", "device-side assert", "unspecified launch failure",
                "misaligned address", "an illegal instruction", "CUDA error: unknown error")
GPU_FAILED_MESSAGE = "The GPU failed and the server is restarting. Please try again in a minute."

T = TypeVar("T")

TOO_LARGE_MESSAGE = ("This request does not fit in the GPU memory, even alone. Try fewer or smaller "
                     "images, a shorter chat, or fewer new tokens.")


def is_out_of_memory(exc: BaseException) -> bool:
    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()


def is_sticky(exc: BaseException) -> bool:
    """Whether `exc` left the device unusable (every later call would fail too)."""
    if is_out_of_memory(exc):
        return False
    text = str(exc)
    return isinstance(exc, torch.AcceleratorError) or any(sign in text for sign in STICKY_SIGNS)


@dataclass(frozen=True)
class Failure:
    """What the engine keeps of an exception: its kind and the user's message."""

    out_of_memory: bool
    sticky: bool
    message: str
    description: str  # for the log

    @classmethod
    def of(cls, exc: BaseException) -> Failure:
        return cls(out_of_memory=is_out_of_memory(exc), sticky=is_sticky(exc), message=user_message(exc),
                   description=f"{type(exc).__name__}: {str(exc)[:300]}")


def attempt(call: Callable[[], T]) -> tuple[T | None, Failure | None]:
    """`call()`, or what its exception was: the caller handles a failure after the `except`
    block, where the traceback (and the failed step's tensors it pins) is already gone."""
    try:
        return call(), None
    except Exception as exc:  # noqa: BLE001 - every failure is the caller's to handle
        return None, Failure.of(exc)


def user_message(exc: BaseException) -> str:
    """The message for the user of a request that `exc` ended."""
    if is_out_of_memory(exc):
        return TOO_LARGE_MESSAGE
    return f"The model could not answer this request ({type(exc).__name__}). Please try again."


def free_memory() -> None:
    """Give freed GPU blocks back before retrying with less (the allocator keeps them otherwise)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
