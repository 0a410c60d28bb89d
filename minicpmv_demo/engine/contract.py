"""What the front ends may ask of an engine: the local `Engine` and the backend's `RemoteEngine`
both meet `ServingEngine`, so the page, the API and /health never ask which one they have.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from ..intake.conversation import Conversation
from .meter import TokenMeter
from .request import ReplyStream, SamplingParams


@dataclass(frozen=True)
class BackendState:
    """Where a remote engine sends its requests, and how that server answered its last probe."""

    url: str
    reachable: bool
    error: str | None
    kind: str  # "minicpmv-demo", "vllm", or what the server says owns the model
    model: str


@dataclass(frozen=True)
class EngineState:
    """A cheap snapshot for status panels and /health: taken without waiting for the engine."""

    alive: bool
    queue_depth: int  # requests waiting for a place in the batch
    batch_size: int  # requests generating now
    batch_ceiling: int  # the batch's current limit (lowered for a while after running out of memory)
    max_batch: int
    tokens_per_s: float  # all replies together, over the last seconds
    cache_hits: int
    restarts: int
    backend: BackendState | None = None  # set by a remote engine only


class ServingEngine(Protocol):
    """The engine as front ends see it: submit a chat, read a stream, ask how it is."""

    max_batch: int
    meter: TokenMeter

    @property
    def alive(self) -> bool: ...

    @property
    def reads_video(self) -> bool: ...

    @property
    def active_rows(self) -> int: ...

    def submit(self, conversation: Conversation, params: SamplingParams) -> ReplyStream: ...

    def state(self) -> EngineState: ...

    def shutdown(self, timeout: float = 10.0) -> None: ...
