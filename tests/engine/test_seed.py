"""A request's own seed: the same seed gives the same sampled reply, alone or batched with others,
on the tiny model (a draw per step from the request's own generator)."""

from __future__ import annotations

import pytest

from conftest import ask
from minicpmv_demo.engine import SamplingParams

SAMPLED = SamplingParams(max_new_tokens=24, temperature=1.0, seed=1234)
QUESTION = ask("Describe the picture in detail.", "scene.png")


def test_the_same_seed_gives_the_same_reply_alone_or_in_any_batch(make_engine):
    alone = make_engine(max_batch=1, seed=0).submit(QUESTION, SAMPLED).result(timeout=60)
    again = make_engine(max_batch=1, seed=99).submit(QUESTION, SAMPLED).result(timeout=60)
    assert alone and again == alone, "the engine's own seed does not reach a request's draws"
    engine = make_engine(started=False, max_batch=4, seed=7)
    others = [engine.submit(ask(f"Other question {i}?", "chart.png"), SamplingParams(max_new_tokens=24, temperature=1.0))
              for i in range(2)]
    batched = engine.submit(QUESTION, SAMPLED)
    greedy = engine.submit(QUESTION, SamplingParams(max_new_tokens=24))
    engine.start()
    assert batched.result(timeout=60) == alone
    assert batched.stats.batch_size == 4 and all(s.result(timeout=60) is not None for s in [*others, greedy])


def test_other_seeds_give_other_draws(make_engine):
    engine = make_engine(started=False, max_batch=2)
    first = engine.submit(QUESTION, SAMPLED)
    second = engine.submit(QUESTION, SamplingParams(max_new_tokens=24, temperature=1.0, seed=4321))
    engine.start()
    assert first.result(timeout=60) != second.result(timeout=60)


@pytest.mark.parametrize("seed", [True, 1.5, -(2**63) - 1, 2**64])
def test_seeds_must_be_64_bit_whole_numbers(seed):
    with pytest.raises(ValueError, match="seed"):
        SamplingParams(seed=seed)
