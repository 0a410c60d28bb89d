"""Choosing each row's next token with that row's own settings, for the whole batch at once.

Every row's settings (temperature, top-p, top-k, repetition penalty) become [B] tensors once
per step, so a batch of mixed settings costs a handful of tensor ops, not a Python loop over
rows. They are applied in the order of transformers' `generate` (repetition penalty, then
temperature, top-k, top-p), with the same rules, so a row samples from the distribution it
would get alone from `generate`.

Everything runs on the device the logits live on, with a generator of that device: sampling on
a CUDA batch never copies probabilities to the CPU, and the only device-to-host copy per step is
the chosen ids (with each row's validity). A row whose logits are unusable (NaN, +inf, all
-inf) is reported as such instead of raising, so the engine can fail that row alone while the
other rows' tokens of the same step stand.

A request with its own seed draws from a generator of its own (one row of noise per step, the
same whatever the batch holds), so the same seed gives the same sampled reply alone or batched.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from .request import SamplingParams
from .seen_tokens import SeenTokens


@dataclass(frozen=True)
class Sampled:
    """One step's choice for every row: the token, or None for a row that cannot go on."""

    tokens: list[int | None]

    @property
    def failed_rows(self) -> list[int]:
        return [index for index, token in enumerate(self.tokens) if token is None]


@dataclass(frozen=True)
class RowSettings:
    """The batch's sampling settings as [B] tensors on the logits' device, plus what the host
    already knows about them (which steps may be skipped) so that skipping never syncs."""

    temperatures: torch.Tensor  # 0 = greedy
    top_ps: torch.Tensor  # 1 = off
    top_ks: torch.Tensor  # long; 0 = off
    penalties: torch.Tensor  # 1 = off
    any_sampled: bool
    any_filtered: bool  # some sampled row has top-k or top-p on: the vocabulary must be sorted
    any_penalised: bool

    @classmethod
    def of(cls, params: list[SamplingParams], device: torch.device | str) -> RowSettings:
        """Built with one host-to-device copy, whatever the batch size."""
        table = torch.tensor([[p.temperature, p.top_p, p.top_k, p.repetition_penalty] for p in params],
                             dtype=torch.float32).to(device)
        sampled = [p for p in params if not p.greedy]
        return cls(temperatures=table[:, 0], top_ps=table[:, 1], top_ks=table[:, 2].long(), penalties=table[:, 3],
                   any_sampled=bool(sampled),
                   any_filtered=any(p.top_k > 0 or p.top_p < 1.0 for p in sampled),
                   any_penalised=any(p.repetition_penalty != 1.0 for p in params))


def sample_for(logits: torch.Tensor, params: list[SamplingParams], generator: torch.Generator | None = None,
               seen: torch.Tensor | None = None,
               own: Sequence[torch.Generator | None] | None = None) -> Sampled:
    """Next token per row of `logits` [B, V] with row i's `params[i]`.

    `seen` [B, V] (bool) marks the tokens row i already holds in its prompt and reply, which a
    repetition penalty makes rarer; it may be None when no row has a penalty (see SeenTokens).
    `own[i]`: row i's own generator (a request with a seed), or None for the shared `generator`.
    """
    usable = _usable_rows(logits)
    penalised = seen is not None and any(p.repetition_penalty != 1.0 for p in params)
    if all(p.greedy for p in params) and not penalised:  # the common API case: no per-row tensors
        tokens = logits.argmax(dim=-1)
    else:
        tokens, valid = sample_next_tokens(logits, RowSettings.of(params, logits.device), generator, seen, usable,
                                           own)
        usable &= valid
    chosen, ok = torch.stack([tokens, usable.long()]).tolist()  # the step's one device-to-host copy
    return Sampled([token if good else None for token, good in zip(chosen, ok, strict=True)])


def sample_next_tokens(logits: torch.Tensor, settings: RowSettings, generator: torch.Generator | None = None,
                       seen: torch.Tensor | None = None, usable: torch.Tensor | None = None,
                       own: Sequence[torch.Generator | None] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Pick one token per row of `logits` [B, V]: argmax where temperature is 0, else a draw.

    Returns the tokens and which rows' distributions were valid, both on the logits' device.
    Greedy rows take the argmax of their (penalised) logits, exactly. The draw is the
    exponential race (argmax of p / Exp(1) noise picks token i with probability p_i), which
    never raises or syncs on a bad row the way `torch.multinomial` does. `usable`: the rows
    `_usable_rows` finds, when the caller has them already (a pass over the whole vocabulary).
    `own`: per-row generators that replace the shared one for their rows (see `sample_for`).
    """
    usable = _usable_rows(logits) if usable is None else usable
    scores = torch.where(usable[:, None], logits, torch.zeros_like(logits))
    if seen is not None and settings.any_penalised:
        scores = penalize_repetition(scores, seen, settings.penalties)
    greedy = scores.argmax(dim=-1)
    if not settings.any_sampled:
        return greedy, torch.ones_like(greedy, dtype=torch.bool)
    sampled_rows = settings.temperatures > 0
    scores = warp(scores, settings)
    probs = torch.softmax(scores, dim=-1)
    valid = torch.isfinite(probs).all(dim=-1) | ~sampled_rows
    noise = torch.empty_like(probs).exponential_(generator=generator)
    for row, row_generator in enumerate(own or ()):
        if row_generator is not None:
            noise[row].exponential_(generator=row_generator)
    sampled = (probs / noise).argmax(dim=-1)
    return torch.where(sampled_rows, sampled, greedy), valid


def penalize_repetition(scores: torch.Tensor, seen: torch.Tensor, penalties: torch.Tensor) -> torch.Tensor:
    """transformers' RepetitionPenaltyLogitsProcessor, one penalty per row: a token the row has
    seen gets its positive score divided and its negative score multiplied by the penalty."""
    penalty = penalties[:, None]
    penalised = torch.where(scores < 0, scores * penalty, scores / penalty)
    return torch.where(seen, penalised, scores)


def warp(scores: torch.Tensor, settings: RowSettings) -> torch.Tensor:
    """Temperature, then top-k, then top-p, per row; removed tokens get -inf.

    Matches transformers' TemperatureLogitsWarper, TopKLogitsWarper (ties with the k-th score
    stay) and TopPLogitsWarper (the smallest set of likeliest tokens whose mass reaches top_p;
    the likeliest always stays). Greedy rows pass with temperature 1: their result is unused.
    """
    # A tiny positive temperature is floored so that dividing by it cannot overflow to inf.
    temperatures = torch.where(settings.temperatures > 0, settings.temperatures.clamp(min=1e-5),
                               torch.ones_like(settings.temperatures))
    scores = scores / temperatures[:, None]
    if not settings.any_filtered:
        return scores
    ordered, _ = scores.sort(dim=-1, descending=True)
    vocab = scores.shape[-1]
    # Top-k: everything below the k-th score goes (k = 0 is off: the k-th is the last).
    kth = torch.where(settings.top_ks > 0, settings.top_ks.clamp(max=vocab), vocab) - 1
    ordered = ordered.masked_fill(ordered < ordered.gather(-1, kth[:, None]), -torch.inf)
    # Top-p on what top-k left: a token goes once the likelier ones already hold top_p.
    probs = torch.softmax(ordered, dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs
    outside = (mass_before >= settings.top_ps[:, None]) & (settings.top_ps < 1.0)[:, None]
    ordered = ordered.masked_fill(outside, -torch.inf)
    # Removals are a tail of the sorted row: the last kept score is the row's threshold, which
    # filters the row in vocabulary order without scattering the sorted mask back.
    kept = (~torch.isneginf(ordered)).sum(dim=-1).clamp(min=1)
    threshold = ordered.gather(-1, (kept - 1)[:, None])
    return scores.masked_fill(scores < threshold, -torch.inf)


def _usable_rows(logits: torch.Tensor) -> torch.Tensor:
    """Rows [B] with no NaN or +inf and at least one finite score (bool, on the logits' device)."""
    return ~(torch.isnan(logits) | torch.isposinf(logits)).any(dim=-1) & torch.isfinite(logits).any(dim=-1)


class RowSampler:
    """Draws the running requests' next tokens: one generator for the batch, seeded once (per
    device), and the repetition penalty's record of what each request has seen."""

    def __init__(self, seed: int) -> None:
        self.seed = seed
        self._generator: torch.Generator | None = None
        self._seen = SeenTokens()
        self._own: dict[Drawing, torch.Generator] = {}  # the generators of requests with a seed

    def sample(self, rows: Sequence[Drawing], logits: torch.Tensor) -> Sampled:
        """Each row's token from its logits [B, V] with its own settings (None: unusable logits)."""
        if self._generator is None or self._generator.device != logits.device:
            self._generator = torch.Generator(device=logits.device).manual_seed(self.seed)
        own = [self._own_generator(row, logits.device) for row in rows]
        return sample_for(logits, [row.params for row in rows], self._generator, self._seen_tokens(rows, logits),
                          own if any(own) else None)

    def release(self, row: Drawing) -> None:
        """Forget what `row` has seen and its generator (its reply ended)."""
        self._seen.release(row)
        self._own.pop(row, None)

    def _own_generator(self, row: Drawing, device: torch.device) -> torch.Generator | None:
        """A sampled request's own generator, made at its first draw (kept when it is re-admitted
        after running out of memory, so it goes on where it was)."""
        if row.params.seed is None or row.params.greedy:
            return None
        if row not in self._own:
            self._own[row] = row_generator(row.params.seed, device)
        return self._own[row]

    @property
    def held(self) -> int:
        """Requests whose seen tokens are kept (those with a repetition penalty, until they end)."""
        return self._seen.held

    def _seen_tokens(self, rows: Sequence[Drawing], logits: torch.Tensor) -> torch.Tensor | None:
        """What each row has seen so far, for the repetition penalty; None when no row has one."""
        if all(row.params.repetition_penalty == 1.0 for row in rows):
            return None
        return self._seen.lookup([(row, row.prompt.ids, row.generated) if row.params.repetition_penalty != 1.0
                                  else None for row in rows], logits)


def row_generator(seed: int, device: torch.device | str) -> torch.Generator:
    """A request's own generator on `device`."""
    return torch.Generator(device=device).manual_seed(seed)


class Drawing(Protocol):
    """A request as the sampler sees it (`engine.sequence.Sequence`)."""

    params: SamplingParams
    prompt: Any  # with `.ids`, the prompt's token ids
    generated: list[int]
