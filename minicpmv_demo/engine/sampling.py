"""Choosing each row's next token with that row's own settings, for the whole batch at once.

Everything runs on the device the logits live on, with a generator of that device: sampling on
a CUDA batch never copies probabilities to the CPU, and the only device-to-host copy per step is
the chosen ids (with each row's validity). A row whose logits are unusable (NaN, +inf, all
-inf) is reported as such instead of raising, so the engine can fail that row alone while the
other rows' tokens of the same step stand.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .request import SamplingParams


@dataclass(frozen=True)
class Sampled:
    """One step's choice for every row: the token, or None for a row that cannot go on."""

    tokens: list[int | None]

    @property
    def failed_rows(self) -> list[int]:
        return [index for index, token in enumerate(self.tokens) if token is None]


def sample_for(logits: torch.Tensor, params: list[SamplingParams],
               generator: torch.Generator | None = None) -> Sampled:
    """Next token per row of `logits` [B, V] with row i's `params[i]`."""
    usable = _usable_rows(logits)
    if all(p.greedy for p in params):  # the common API case: skip building per-row tensors
        tokens = logits.argmax(dim=-1)
    else:
        temperatures = torch.tensor([p.temperature for p in params], device=logits.device)
        top_ps = torch.tensor([p.top_p for p in params], device=logits.device)
        tokens, valid = sample_next_tokens(logits, temperatures, top_ps, generator)
        usable &= valid
    chosen, ok = torch.stack([tokens, usable.long()]).tolist()  # the step's one device-to-host copy
    return Sampled([token if good else None for token, good in zip(chosen, ok, strict=True)])


def sample_next_tokens(logits: torch.Tensor, temperatures: torch.Tensor, top_ps: torch.Tensor,
                       generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Pick one token per row of `logits` [B, V]: argmax where temperature is 0, else top-p sampling.

    Returns the tokens and which rows' distributions were valid, both on the logits' device.
    Vectorised so that a batch of mixed greedy and sampled requests costs one pass, not B; the
    draw is the exponential race (argmax of p / Exp(1) noise picks token i with probability
    p_i), which never raises or syncs on a bad row the way `torch.multinomial` does.
    """
    greedy = logits.argmax(dim=-1)
    sampled_rows = temperatures > 0
    safe_logits = torch.where(_usable_rows(logits)[:, None], logits, torch.zeros_like(logits))
    probs = torch.softmax(safe_logits / temperatures.clamp(min=1e-5)[:, None], dim=-1)
    valid = torch.isfinite(probs).all(dim=-1) | ~sampled_rows
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    # Keep the smallest prefix whose mass reaches top_p (the first token always survives).
    outside = sorted_probs.cumsum(dim=-1) - sorted_probs > top_ps[:, None]
    sorted_probs = sorted_probs.masked_fill(outside, 0.0)
    noise = torch.empty_like(sorted_probs).exponential_(generator=generator)
    choice = (sorted_probs / noise).argmax(dim=-1, keepdim=True)
    sampled = order.gather(-1, choice).squeeze(-1)
    return torch.where(sampled_rows, sampled, greedy), valid


def _usable_rows(logits: torch.Tensor) -> torch.Tensor:
    """Rows [B] with no NaN or +inf and at least one finite score (bool, on the logits' device)."""
    return ~(torch.isnan(logits) | torch.isposinf(logits)).any(dim=-1) & torch.isfinite(logits).any(dim=-1)
