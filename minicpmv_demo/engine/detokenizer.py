"""Turning a row's growing list of token ids into text pieces that are safe to show."""

from __future__ import annotations


class IncrementalDecoder:
    """Emits only the new text of each token, without decoding the whole reply every step.

    Decodes a short window of recent tokens (from `prefix` on) with and without the new ones,
    and emits the difference: tokenizers that merge pieces (byte-level BPE, WordPiece prefixes,
    spaces before words) then still produce the right text. The window without the new token
    is usually one token, whose text is remembered, so most tokens cost one decode. A piece that
    ends in an unfinished UTF-8 character is held back until the next token completes it.
    Special tokens (image placeholders, end markers) are skipped; `<think>` and `</think>` are
    ordinary added tokens in Qwen3.5's vocabulary (and the tiny model's), so they stay in the
    text, where reasoning.split_reasoning finds them.
    """

    def __init__(self, tokenizer, token_texts: dict[int, str] | None = None) -> None:
        """`token_texts`, shared by the decoders of one engine thread, remembers each token's text
        alone: the window without the new token is usually the one token emitted last, so that
        half of the decoding becomes a lookup (bounded by the vocabulary)."""
        self._tokenizer = tokenizer
        self._token_texts = token_texts if token_texts is not None else {}
        self._ids: list[int] = []
        self._prefix = 0  # start of the window used as context
        self._read = 0  # tokens before this are already emitted

    def push(self, token_id: int) -> str:
        self._ids.append(token_id)
        before = self._decode(self._ids[self._prefix:self._read])
        after = self._decode(self._ids[self._prefix:])
        if after.endswith("\ufffd") or len(after) <= len(before):
            return ""
        self._prefix, self._read = self._read, len(self._ids)
        return after[len(before):]

    def _decode(self, ids: list[int]) -> str:
        if len(ids) != 1:
            return self._tokenizer.decode(ids, skip_special_tokens=True) if ids else ""
        text = self._token_texts.get(ids[0])
        if text is None:
            text = self._token_texts[ids[0]] = self._tokenizer.decode(ids, skip_special_tokens=True)
        return text
