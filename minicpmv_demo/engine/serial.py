"""Serving a runner that cannot batch (legacy remote-code `chat()` models): one request at a time."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from ..model.runner import SerialRunner
from .failures import user_message
from .request import FinishReason

if TYPE_CHECKING:
    from .engine import Engine


def serve_one_serially(engine: Engine) -> None:
    """Stream the next waiting request's reply to its end through `runner.stream`."""
    sequence = engine.scheduler.next_waiting()
    if sequence is None:
        return
    runner: SerialRunner = engine.runner  # type: ignore[assignment]
    sequence.start(time.perf_counter())
    engine.running = [sequence]
    try:
        for piece in runner.stream(sequence.prompt, sequence.params, lambda: sequence.cancelled):
            sequence.generated.append(0)  # chat() yields text pieces, not ids: count them as tokens
            sequence.stream.append(piece)
            engine.meter.count(1)
        engine.finish(sequence, FinishReason.CANCELLED if sequence.cancelled else FinishReason.STOP)
    except Exception as exc:  # noqa: BLE001
        engine.fail(sequence, user_message(exc))
    finally:
        engine.running = []
        engine.reset_peak()
