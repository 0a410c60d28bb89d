"""Greedy replies remembered by chat and settings: a visitor who clicks an example someone else
clicked, or asks the same question about the same picture again, is answered at once.

Only greedy replies are kept (a sampled reply is meant to differ each time), and only whole ones
(a stopped or failed reply is not the answer).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from ..intake.conversation import Conversation
from ..system.lru import LruCache
from .request import FinishReason, ReplyStats, ReplyStream, SamplingParams
from .sequence import Sequence


@dataclass(frozen=True)
class CachedReply:
    """A finished greedy reply, with what its stream said about it besides the text."""

    text: str
    thinking: bool
    prompt_tokens: int
    tokens: int


class ReplyCache:
    """Up to `capacity` replies, least recently used out first (0: off)."""

    def __init__(self, capacity: int) -> None:
        self._replies: LruCache[CachedReply] = LruCache(capacity)

    @property
    def hits(self) -> int:
        return self._replies.hits

    def key(self, conversation: Conversation, params: SamplingParams) -> str | None:
        """Where a reply to this chat with these settings is kept; None: not cacheable."""
        if not params.greedy or self._replies.capacity <= 0:
            return None
        return f"{conversation.digest()}:{params.max_new_tokens}:{params.repetition_penalty}"

    def answer(self, key: str | None, stream: ReplyStream) -> bool:
        """Fill `stream` with the reply kept under `key`, if there is one; returns whether it did."""
        cached = self._replies.get(key) if key else None
        if cached is None:
            return False
        stream.thinking, stream.prompt_tokens = cached.thinking, cached.prompt_tokens
        stream.append(cached.text)
        stream.finish(ReplyStats(tokens=cached.tokens, seconds=time.perf_counter() - stream.submitted_at,
                                 batch_size=0, peak_memory_mb=None, finish_reason=FinishReason.STOP,
                                 from_cache=True))
        return True

    def remember(self, sequence: Sequence, reason: FinishReason) -> None:
        """Keep a whole greedy reply (one that stopped or reached its length)."""
        if sequence.cache_key and reason in (FinishReason.STOP, FinishReason.LENGTH):
            stream = sequence.stream
            self._replies.put(sequence.cache_key, CachedReply(stream.text, stream.thinking, stream.prompt_tokens,
                                                              len(sequence.generated)))
