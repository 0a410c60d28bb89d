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
from collections.abc import Callable, Iterator

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
    """`decode_batch` wrapped in `@spaces.GPU` when running on ZeroGPU; None elsewhere."""
    spaces = sys.modules.get("spaces")
    config = getattr(getattr(spaces, "config", None), "Config", None)
    if spaces is None or not getattr(config, "zero_gpu", False):
        return None
    return spaces.GPU(duration=seconds)(decode_batch)


def decode_batch(runner, prompts: list, params: list, seed: int,
                 stop_token_ids: frozenset[int]) -> Iterator[list[tuple[int, int]] | dict]:
    """Prefill `prompts` together and decode them to the end, in one GPU call.

    Yields, per step, `(row, token)` for each row still running (token None: that row's logits
    were unusable, and it ends there), and finally `{"peak_memory_mb": ...}` measured here, where
    CUDA is real. A row ends on a stop token or its own `max_new_tokens`; the engine stops
    reading when every row it still cares about is done.
    """
    import torch

    from ..engine.sampling import sample_for
    from ..engine.seen_tokens import SeenTokens
    from .gpu import peak_memory_mb, reset_peak_memory

    reset_peak_memory()
    with torch.inference_mode():
        batch, logits = runner.prefill(prompts, [[] for _ in prompts])
        generator = torch.Generator(device=logits.device).manual_seed(seed)
        alive = list(range(len(prompts)))
        counts = [0] * len(prompts)
        replies: list[list[int]] = [[] for _ in prompts]  # what a repetition penalty counts
        seen = SeenTokens()
        while alive:
            penalised = [(row, prompts[row].ids, replies[row]) if params[row].repetition_penalty != 1.0 else None
                         for row in alive]
            history = seen.lookup(penalised, logits) if any(penalised) else None
            tokens = sample_for(logits, [params[i] for i in alive], generator, history).tokens
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
