"""Fitting a chat into the model's context window: the oldest exchanges leave first.

A long chat must not cost the server more than the part the model can read. Each turn is
measured once, newest first, and measuring stops as soon as the turns kept fill the window, so
a 160-turn history costs about what a window's worth of text costs; then the kept part is
encoded once. (Dropping one exchange at a time and re-encoding the rest after each drop made a
160-turn chat cost minutes: quadratic in the history.)
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from ..intake.conversation import Conversation, Turn
from .request import ReplyStream, SamplingParams

# Most extra encodes when the measured turns turn out to be longer than counted (the template
# adds a few tokens per message that a turn measured alone may not show).
MAX_EXTRA_ENCODES = 3


class ContextError(ValueError):
    """The newest message alone does not fit; str() is the message for the user."""


@dataclass(frozen=True)
class FittedPrompt:
    prompt: object  # what the runner's `encode` returned for the turns kept
    max_new_tokens: int  # lowered when the prompt leaves less room than asked for
    dropped_exchanges: int


def fit_to_context(runner, conversation: Conversation, max_new_tokens: int,
                   context: int | None = None) -> FittedPrompt:
    """Encode the newest part of `conversation` that leaves room for `max_new_tokens`.

    `runner` gives `encode(conversation)` (with `.length`), `turn_length(turn, options)` (an
    estimate with the request's visual settings that does not undercount by more than the
    template's few tokens) and `context_length`; `context` (the engine's --max-model-len)
    replaces the latter when given.
    """
    context = context or runner.context_length
    budget = max(context - max_new_tokens, 1)  # room for the prompt
    starts = _exchange_starts(conversation)
    keep = starts.index(_first_kept_turn(runner, conversation, budget))
    prompt = runner.encode(conversation.since(starts[keep]))
    for _ in range(MAX_EXTRA_ENCODES):
        if prompt.length <= budget or keep + 1 >= len(starts):
            break
        keep += 1
        prompt = runner.encode(conversation.since(starts[keep]))
    if prompt.length >= context:
        raise ContextError(f"This message is too long for the model ({prompt.length} tokens; the model "
                           f"reads at most {context}). Please shorten it or use a smaller image.")
    return FittedPrompt(prompt=prompt, max_new_tokens=min(max_new_tokens, context - prompt.length),
                        dropped_exchanges=keep)


def fit_for_stream(runner, conversation: Conversation, params: SamplingParams, context: int,
                   stream: ReplyStream) -> tuple[Any, SamplingParams] | None:
    """`fit_to_context` for one request: the prompt and its settings (max_new_tokens lowered to
    what fits), with a notice on `stream` when exchanges were left out; None after failing
    `stream` when even the newest message does not fit."""
    try:
        fitted = fit_to_context(runner, conversation, params.max_new_tokens, context)
    except ContextError as exc:
        stream.fail(str(exc), refused=True)  # the request's own fault: an API answers 400
        return None
    dropped = fitted.dropped_exchanges
    if dropped:
        stream.notices.append(f"The chat was too long for the model: the oldest {dropped} "
                              f"exchange{'s' if dropped > 1 else ''} left out.")
    return fitted.prompt, replace(params, max_new_tokens=fitted.max_new_tokens)


def _first_kept_turn(runner, conversation: Conversation, budget: int) -> int:
    """Index of the oldest user turn from which the chat still fits `budget`, measured newest
    first and no further back than needed; the newest question is always kept."""
    turns = conversation.turns
    first = _exchange_starts(conversation)[-1]
    options = conversation.options
    total = runner.turn_length(Turn("user", conversation.system_prompt), options) if conversation.system_prompt else 0
    for index in range(len(turns) - 1, -1, -1):
        total += runner.turn_length(turns[index], options)
        if total > budget:
            break
        if turns[index].role == "user":
            first = index
    return first


def _exchange_starts(conversation: Conversation) -> list[int]:
    """Where each exchange begins: the user turns (a chat alternates, opening with the user)."""
    return [index for index, turn in enumerate(conversation.turns) if turn.role == "user"]
