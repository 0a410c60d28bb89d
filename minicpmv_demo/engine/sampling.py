"""Choosing each row's next token with that row's own settings, for the whole batch at once."""

from __future__ import annotations

import torch

from .request import SamplingParams


def sample_for(logits: torch.Tensor, params: list[SamplingParams],
               generator: torch.Generator | None = None) -> torch.Tensor:
    """Next token per row of `logits` [B, V] with row i's `params[i]`; returned on the CPU."""
    if all(p.greedy for p in params):  # the common API case: skip building per-row tensors
        return logits.argmax(dim=-1).cpu()
    temperatures = torch.tensor([p.temperature for p in params], device=logits.device)
    top_ps = torch.tensor([p.top_p for p in params], device=logits.device)
    return sample_next_tokens(logits, temperatures, top_ps, generator).cpu()


def sample_next_tokens(logits: torch.Tensor, temperatures: torch.Tensor, top_ps: torch.Tensor,
                       generator: torch.Generator | None = None) -> torch.Tensor:
    """Pick one token per row of `logits` [B, V]: argmax where temperature is 0, else top-p sampling.

    Vectorised so that a batch of mixed greedy and sampled requests costs one pass, not B.
    """
    greedy = logits.argmax(dim=-1)
    sampled_rows = temperatures > 0
    if not bool(sampled_rows.any()):
        return greedy
    scaled = logits / temperatures.clamp(min=1e-5)[:, None]
    probs = torch.softmax(scaled, dim=-1)
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    # Keep the smallest prefix whose mass reaches top_p (the first token always survives).
    outside = sorted_probs.cumsum(dim=-1) - sorted_probs > top_ps[:, None]
    sorted_probs = sorted_probs.masked_fill(outside, 0.0)
    choice = torch.multinomial(sorted_probs.cpu(), 1, generator=generator).to(order.device)
    sampled = order.gather(-1, choice).squeeze(-1)
    return torch.where(sampled_rows, sampled, greedy)
