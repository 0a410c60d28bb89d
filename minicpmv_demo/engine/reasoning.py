"""Splitting a reply into its reasoning ("thinking") and its answer, as the text streams in.

MiniCPM-V 4.6 follows Qwen3.5: with thinking on, the chat template ends the prompt with an open
`<think>` block, so the reply is reasoning until the model writes `</think>` (and a reply that
never closes it is all reasoning). A checkpoint may also open the block itself in its output.
Front ends show the two parts apart and never send the reasoning back to the model.
"""

from __future__ import annotations

from dataclasses import dataclass

THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"


@dataclass(frozen=True)
class ReplyParts:
    """One reply's text, split. `reasoning` is None for a reply that did not think."""

    reasoning: str | None
    answer: str
    reasoning_done: bool  # False while the reasoning is still being written


def split_reasoning(text: str, opened_in_prompt: bool) -> ReplyParts:
    """Split `text` (the reply so far) at `</think>`.

    `opened_in_prompt`: the prompt ended with `<think>`, so the reply starts inside the block.
    While streaming, a tag that has only partly arrived ("</thi") is held back, not shown.
    """
    if not opened_in_prompt:
        stripped = text.lstrip()
        if not stripped.startswith(THINK_OPEN):
            if THINK_OPEN.startswith(stripped) and stripped:
                return ReplyParts(reasoning=None, answer="", reasoning_done=False)
            return ReplyParts(reasoning=None, answer=text, reasoning_done=True)
        text = stripped[len(THINK_OPEN):]
    reasoning, closed, answer = text.partition(THINK_CLOSE)
    if not closed:
        return ReplyParts(reasoning=_without_partial_tag(reasoning).strip(), answer="", reasoning_done=False)
    return ReplyParts(reasoning=reasoning.strip(), answer=answer.lstrip(), reasoning_done=True)


def _without_partial_tag(text: str) -> str:
    """`text` less a trailing beginning of `</think>` that the next tokens may complete."""
    for size in range(min(len(THINK_CLOSE) - 1, len(text)), 0, -1):
        if text.endswith(THINK_CLOSE[:size]):
            return text[:-size]
    return text


def prompt_opens_reasoning(prompt_text: str) -> bool:
    """Whether a rendered prompt ends inside an open `<think>` block (Qwen3.5's generation
    prompt with thinking on), so the reply starts as reasoning.

    Read from the text the template produced, not from the switch that was asked for: a
    template without the switch, or one that always thinks, is then described truthfully.
    """
    return prompt_text.rstrip().endswith(THINK_OPEN)


def without_reasoning(text: str) -> str:
    """An earlier assistant message as it goes back to the model: its answer, never its reasoning.

    What precedes the last `</think>` is reasoning (as Qwen3.5's template reads it); a message
    that opens `<think>` and never closes it was cut while reasoning and has no answer at all.
    """
    if THINK_CLOSE in text:
        return text.rsplit(THINK_CLOSE, 1)[1].lstrip()
    if text.lstrip().startswith(THINK_OPEN):
        return ""
    return text
