"""Hugging Face ZeroGPU: a GPU is lent per call, only inside functions decorated `@spaces.GPU`.

On a ZeroGPU Space, CUDA is real only while a `@spaces.GPU` function runs, in a process the
`spaces` package forks for it; what that process changes is gone when it returns. So the engine
cannot keep a running batch between calls there. Instead it takes the requests waiting at that
moment, and one GPU call prefills and decodes them together to the end, yielding each step's
tokens back to the engine thread, which streams them as usual. Requests that arrive meanwhile
form the next batch. Everywhere else (`spaces` absent, or not on ZeroGPU) none of this is used.

`spaces` must be imported before torch (it patches torch at import): `app.py` calls
`import_spaces_first()` before anything else.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable

# The longest one batch may hold the lent GPU, in seconds (ZeroGPU's quota unit).
GPU_CALL_SECONDS = 120


def import_spaces_first():
    """Import `spaces` if it is installed (before torch, as ZeroGPU requires); else None."""
    if "spaces" in sys.modules:
        return sys.modules["spaces"]
    try:
        return importlib.import_module("spaces")
    except ImportError:
        return None


def zerogpu_batch_call(seconds: int = GPU_CALL_SECONDS) -> Callable | None:
    """The engine's `decode_batch` (engine/one_call.py) wrapped in `@spaces.GPU` when running on
    ZeroGPU; None elsewhere."""
    spaces = sys.modules.get("spaces")
    config = getattr(getattr(spaces, "config", None), "Config", None)
    if spaces is None or not getattr(config, "zero_gpu", False):
        return None
    from ..engine.one_call import decode_batch

    return spaces.GPU(duration=seconds)(decode_batch)

