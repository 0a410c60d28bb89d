"""The tokens each row with a repetition penalty has met so far, for the sampler.

A repetition penalty (transformers' RepetitionPenaltyLogitsProcessor) reads a row's whole
history, prompt and reply, at every step. Sending every row's ids each step would cost the host
work of the prompt's length per row per step; this table instead keeps one [slots, V] boolean
row of presence per penalised request on the logits' device. It learns a request's prompt once,
then only the tokens it accepted since the last step (all rows in one `index_put`), and a step
reads the batch's rows with one `index_select`. Rows without a penalty point at slot 0, which
stays empty, and cost nothing. At the real vocabulary (248k) a slot is 248 KB.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

# Slots made at first (slot 0, the empty one, included); the table doubles when they run out.
INITIAL_SLOTS = 9


@dataclass
class _Learned:
    owner: object  # kept referenced, so its id() cannot be reused while the slot is held
    slot: int
    reply_tokens: int  # how much of the owner's reply the slot holds already


class SeenTokens:
    """Per-request token presence, keyed by the request object (the engine's row)."""

    def __init__(self) -> None:
        self._table: torch.Tensor | None = None
        self._learned: dict[int, _Learned] = {}
        self._free: list[int] = []

    def lookup(self, rows: Sequence[tuple[object, torch.Tensor, Sequence[int]] | None],
               logits: torch.Tensor) -> torch.Tensor:
        """[B, V] presence for a step whose logits are `logits` [B, V].

        Row i is `(owner, prompt_ids, reply)` for a request with a penalty (`reply` is the
        list of tokens it accepted so far, which the table follows as it grows), or None for
        a request without one (an all-False row).
        """
        vocab = logits.shape[-1]
        if self._table is None or self._table.device != logits.device or self._table.shape[1] != vocab:
            self._reset(vocab, logits.device)
        slots, new_slots, new_tokens = [], [], []
        for row in rows:
            if row is None:
                slots.append(0)
                continue
            owner, prompt_ids, reply = row
            learned = self._learned.get(id(owner))
            if learned is None:
                learned = self._learn_prompt(owner, prompt_ids)
            fresh = reply[learned.reply_tokens:]
            new_slots.extend([learned.slot] * len(fresh))
            new_tokens.extend(fresh)
            learned.reply_tokens = len(reply)
            slots.append(learned.slot)
        if new_tokens:
            where = torch.tensor([new_slots, new_tokens]).to(logits.device)
            self._table[where[0], where[1]] = True
        return self._table.index_select(0, torch.tensor(slots).to(logits.device))

    def release(self, owner: object) -> None:
        """The request ended: its slot goes to the next penalised request (a no-op if it had none)."""
        learned = self._learned.pop(id(owner), None)
        if learned is not None:
            self._free.append(learned.slot)

    @property
    def held(self) -> int:
        """Slots in use (for tests and status)."""
        return len(self._learned)

    def _reset(self, vocab: int, device: torch.device) -> None:
        """A new vocabulary or device: start empty; requests learn their history again."""
        self._table = torch.zeros((INITIAL_SLOTS, vocab), dtype=torch.bool, device=device)
        self._learned.clear()
        self._free = list(range(INITIAL_SLOTS - 1, 0, -1))

    def _learn_prompt(self, owner: object, prompt_ids: torch.Tensor) -> _Learned:
        if not self._free:
            grown = torch.zeros_like(self._table)
            self._free = list(range(2 * len(self._table) - 1, len(self._table) - 1, -1))
            self._table = torch.cat([self._table, grown])
        slot = self._free.pop()
        ids = prompt_ids[prompt_ids < self._table.shape[1]]  # on the host: no device sync
        self._table[slot] = False
        self._table[slot, ids.to(self._table.device)] = True
        learned = self._learned[id(owner)] = _Learned(owner=owner, slot=slot, reply_tokens=0)
        return learned
