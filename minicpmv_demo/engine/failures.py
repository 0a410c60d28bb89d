"""What a failed request's user reads, and the one test for running out of memory.

Out of memory is no fault of a request: the engine answers it by admitting fewer at once
(engine.py); only a request too large even alone is told so.
"""

from __future__ import annotations

import gc

import torch

TOO_LARGE_MESSAGE = ("This request does not fit in the GPU memory, even alone. Try fewer or smaller "
                     "images, a shorter chat, or fewer new tokens.")


def is_out_of_memory(exc: BaseException) -> bool:
    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()


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
