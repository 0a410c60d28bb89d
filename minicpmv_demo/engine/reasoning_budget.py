"""A cap on how long one reply may reason before it must answer.

Reasoning models sometimes think in circles until they run out of tokens (MiniCPM-V upstream
issue #1032), leaving the user a wall of reasoning and no answer. Each thinking row therefore
gets a budget of tokens inside its open `<think>` block; once spent, the row's next token is
`</think>` instead of whatever was sampled, so the model goes on to write its answer, and the
user is told the reasoning was cut.

The engine asks `ReasoningBudget.steer` for every token a row takes, at one place; nothing else
in the engine knows about reasoning.
"""

from __future__ import annotations

from dataclasses import dataclass

from .reasoning import THINK_CLOSE, THINK_OPEN

# The answer keeps at least this share of a reply's max_new_tokens: reasoning never takes it all.
ANSWER_SHARE = 4  # reasoning gets at most 3/4


@dataclass(frozen=True)
class ReasoningTags:
    """The token ids of `<think>` and `</think>` in one tokenizer."""

    open_id: int
    close_id: int


def reasoning_tags(tokenizer) -> ReasoningTags | None:
    """The reasoning tags' ids, or None when the vocabulary does not hold each as one token
    (a model without reasoning tags: nothing to count, nothing to force)."""
    ids = [tokenizer.encode(tag, add_special_tokens=False) for tag in (THINK_OPEN, THINK_CLOSE)]
    if any(len(tag_ids) != 1 for tag_ids in ids) or ids[0][0] == getattr(tokenizer, "unk_token_id", None):
        return None
    return ReasoningTags(open_id=ids[0][0], close_id=ids[1][0])


def thinking_limit(max_thinking_tokens: int, max_new_tokens: int) -> int:
    """One reply's reasoning budget: the server's cap, but never so much of the reply's own
    `max_new_tokens` that no room is left for the answer. 0 means no cap."""
    if max_thinking_tokens <= 0:
        return 0
    room = max_new_tokens - max(1, max_new_tokens // ANSWER_SHARE)
    return max(1, min(max_thinking_tokens, room))


class ReasoningBudget:
    """Counts one row's tokens inside its `<think>` block and closes the block when spent."""

    def __init__(self, tags: ReasoningTags, limit: int, opened_in_prompt: bool) -> None:
        self.tags = tags
        self.limit = limit
        self.inside = opened_in_prompt  # a model may also open the block itself
        self.spent = 0

    def steer(self, token: int) -> tuple[int, str | None]:
        """The token the row takes instead of `token` (itself, or `</think>` once the budget is
        spent) and, when it was forced, the notice that tells the user."""
        notice = None
        if self.inside and self.spent >= self.limit:
            token = self.tags.close_id
            notice = f"Reasoning was cut at {self.spent} tokens (the server's limit) so that the model answers."
        if token == self.tags.close_id:
            self.inside = False
        elif token == self.tags.open_id:
            self.inside = True
        elif self.inside:
            self.spent += 1
        return token, notice


def budget_for(tags: ReasoningTags | None, max_thinking_tokens: int, max_new_tokens: int,
               opened_in_prompt: bool) -> ReasoningBudget | None:
    """A row's budget, or None when there is nothing to cap (no tags, or no cap set)."""
    limit = thinking_limit(max_thinking_tokens, max_new_tokens)
    if tags is None or not limit:
        return None
    return ReasoningBudget(tags, limit, opened_in_prompt)
