"""What every model runner must provide: the contract between the engine and a model family.

The engine decides which requests run together; a runner executes that on its model. Every
family (MiniCPM-V 4.x in minicpmv4/, 2.5 and 2.6 in minicpmv2/) meets `BatchRunner`: it encodes
conversations on the callers' threads, prefills newcomers, merges them into preallocated slots,
runs one decode step for every row, and lets rows leave (model/batched_runner.py does the
batching part for all of them). No runner has a generation loop of its own: Stop, failures and
memory are the engine's, for every model alike.

Capabilities that differ between runners are fields with a value (`reads_video`,
`thinks_by_default`, `reasoning_tags`): the engine reads them and never probes a runner for
methods.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

import torch

if TYPE_CHECKING:
    from ..engine.reasoning_budget import ReasoningTags
    from ..intake.conversation import Conversation, PromptOptions, Turn


class EncodedPrompt(Protocol):
    """One conversation as the runner encoded it (kept on the CPU until its prefill)."""

    thinking: bool  # the prompt ends inside an open `<think>`: the reply starts as reasoning

    @property
    def length(self) -> int: ...  # tokens, placeholders of pictures and videos included

    @property
    def ids(self) -> torch.Tensor: ...  # token ids [L] (what a repetition penalty counts as seen)


class Runner(Protocol):
    """What the engine and the context fitting ask of every runner."""

    tokenizer: Any  # decodes the reply's tokens (a transformers tokenizer)
    stop_token_ids: frozenset[int]  # any of them ends a reply
    context_length: int  # tokens the model reads at most (prompt and reply)
    reasoning_tags: ReasoningTags | None  # `<think>` / `</think>` ids; None: the model never reasons
    thinks_by_default: bool  # what a request that does not choose gets
    reads_video: bool  # whether conversations may hold videos (the front ends refuse them otherwise)

    def encode(self, conversation: Conversation) -> EncodedPrompt:
        """The prompt the model reads for `conversation` (called on the callers' threads)."""

    def turn_length(self, turn: Turn, options: PromptOptions) -> int:
        """Tokens `turn` takes in a prompt, never fewer than encoding it gives (fitting a long
        chat measures turns newest first with this, and encodes only what fits)."""


class BatchRunner(Runner, Protocol):
    """A runner whose requests share one batch, joining and leaving between decode steps.

    The batch state (`batch` below) is the runner's own: preallocated slots for the running
    rows, or (a newcomer's prefill, ZeroGPU's one-call batch) a transformers cache.
    """

    devices: list[torch.device]  # where the model's layers live (memory is measured there)
    capturable: bool  # whether decode steps may be captured as CUDA graphs (not int8)

    def prefill(self, prompts: list[EncodedPrompt], generated: list[list[int]]) -> tuple[Any, torch.Tensor]:
        """Prefill prompts together (each continued by the tokens it already generated, when
        re-admitted after running out of memory); returns their batch and next-token logits [B, V]."""

    def begin_prefill(self, prompt: EncodedPrompt, generated: list[int]) -> Any:
        """Start prefilling one long prompt a piece at a time (see `prefill_some`)."""

    def prefill_some(self, partial: Any, tokens: int) -> tuple[Any, torch.Tensor] | None:
        """Prefill the next `tokens` of `partial`; returns what `prefill` returns once all is in."""

    def merge(self, batch: Any, newcomer: Any) -> Any:
        """`batch` with `newcomer`'s prefilled rows appended (row order kept)."""

    def step(self, batch: Any, tokens: torch.Tensor) -> torch.Tensor:
        """Feed each row its last token [B]; returns next-token logits [B, V]."""

    def select(self, batch: Any, keep: list[int]) -> Any:
        """Keep only rows `keep`, in that order (`keep[p] >= p`: a hole takes a later row)."""

    def empty(self, batch: Any) -> Any:
        """Drop every row (after a failure); preallocated slots are cleared and kept."""

    def new_slots(self, slots: int, max_len: int, capture: bool = True) -> Any:
        """Preallocate `slots` rows of `max_len` tokens; capture decode steps if `capture` and
        the device allows. Returns the empty batch."""

    def slot_bytes(self, slots: int, max_len: int) -> int:
        """What `new_slots(slots, max_len)` allocates."""

    def slot_length(self, slots: int, requested: int, budget_bytes: int | None) -> int:
        """Tokens one slot holds: `requested` if set, else what the memory budget allows."""

    def prefill_bytes(self, rows: int, width: int) -> int:
        """About the most memory a prefill of `rows` rows padded to `width` tokens takes."""

    def working_bytes(self, max_batch: int) -> int:
        """Memory the runner may still take beside slots and prefills (sampler, feature caches)."""

