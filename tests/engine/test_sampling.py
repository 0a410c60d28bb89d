"""The batched sampler against transformers' own logits processors, per row, and the repetition
penalty through the engine against `model.generate`."""

from __future__ import annotations

import pytest
import torch
from transformers.generation.logits_process import (RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper,
                                                    TopKLogitsWarper, TopPLogitsWarper)

from conftest import ask
from minicpmv_demo.engine import SamplingParams
from minicpmv_demo.engine.sampling import RowSettings, penalize_repetition, sample_for, warp
from minicpmv_demo.engine.seen_tokens import INITIAL_SLOTS, SeenTokens
from minicpmv_demo.engine.one_call import decode_batch

VOCAB = 120
# One batch, every kind of row: greedy, plain sampling, each filter alone, all together.
MIXED = [
    SamplingParams(),
    SamplingParams(temperature=0.7),
    SamplingParams(temperature=1.3, top_k=5),
    SamplingParams(temperature=0.9, top_p=0.6),
    SamplingParams(temperature=0.5, top_k=40, top_p=0.9, repetition_penalty=1.4),
    SamplingParams(repetition_penalty=1.8),  # greedy with a penalty
    SamplingParams(temperature=1.0, top_k=1),
    SamplingParams(temperature=2.0, top_p=0.95, repetition_penalty=0.7),  # below 1 favours repeats
]


def hf_reference(scores: torch.Tensor, history: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """One row through the processors `generate` would build for `params` (and in its order)."""
    scores, history = scores[None].clone(), history[None]
    if params.repetition_penalty != 1.0:
        scores = RepetitionPenaltyLogitsProcessor(params.repetition_penalty)(history, scores)
    if params.greedy:
        return scores[0]
    scores = TemperatureLogitsWarper(params.temperature)(history, scores)
    if params.top_k:
        scores = TopKLogitsWarper(params.top_k)(history, scores)
    if params.top_p < 1.0:
        scores = TopPLogitsWarper(params.top_p)(history, scores)
    return scores[0]


def histories(count: int, generator: torch.Generator) -> list[torch.Tensor]:
    """Different prompts with repeats: the penalty counts a token once, however often it came."""
    return [torch.randint(0, VOCAB, (int(torch.randint(3, 30, (1,), generator=generator)),), generator=generator)
            for _ in range(count)]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_each_row_is_warped_as_transformers_would_alone(seed):
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(len(MIXED), VOCAB, generator=generator) * 4
    logits[:, :10] = -logits[:, :10].abs()  # negative scores too, which the penalty multiplies
    prompts = histories(len(MIXED), generator)
    seen = SeenTokens().lookup([(i, ids, []) for i, ids in enumerate(prompts)], logits)
    settings = RowSettings.of(MIXED, logits.device)
    ours = warp(penalize_repetition(logits, seen, settings.penalties), settings)
    for row, params in enumerate(MIXED):
        expected = hf_reference(logits[row], prompts[row], params)
        if params.greedy:  # greedy rows are only penalised: their warp is unused
            assert penalize_repetition(logits, seen, settings.penalties)[row].argmax() == expected.argmax()
            continue
        kept = torch.isfinite(expected)
        assert torch.equal(torch.isfinite(ours[row]), kept), f"row {row} keeps other tokens than transformers"
        torch.testing.assert_close(ours[row][kept], expected[kept])


def test_filters_keep_what_they_promise():
    logits = torch.log(torch.tensor([[0.4, 0.3, 0.2, 0.05, 0.05]])).repeat(4, 1)
    params = [SamplingParams(temperature=1.0, top_k=2), SamplingParams(temperature=1.0, top_p=0.7),
              SamplingParams(temperature=1.0, top_p=0.71), SamplingParams(temperature=1.0)]
    kept = torch.isfinite(warp(logits, RowSettings.of(params, "cpu")))
    assert kept.sum(dim=-1).tolist() == [2, 2, 3, 5]


def test_draws_follow_the_filtered_distribution():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).repeat(6000, 1)
    generator = torch.Generator().manual_seed(3)
    tokens = sample_for(logits, [SamplingParams(temperature=1.0, top_k=2)] * 6000, generator).tokens
    assert set(tokens) == {0, 1}
    assert tokens.count(0) / 6000 == pytest.approx(0.5 / 0.8, abs=0.03), "renormalised over the two kept"
    cold = sample_for(logits, [SamplingParams(temperature=0.25)] * 6000, generator).tokens
    assert cold.count(0) / 6000 == pytest.approx(0.5**4 / (0.5**4 + 0.3**4 + 0.15**4 + 0.05**4), abs=0.03)


def test_greedy_rows_take_the_exact_argmax_and_a_penalty_moves_it():
    logits = torch.tensor([[3.0, 2.9, -1.0, 0.5], [3.0, 2.9, -1.0, 0.5]])
    seen = torch.tensor([[True, False, False, False]] * 2)
    params = [SamplingParams(), SamplingParams(repetition_penalty=1.2)]
    assert sample_for(logits, params, seen=seen).tokens == [0, 1]
    assert sample_for(logits, params[:1] * 2, seen=seen).tokens == [0, 0], "no penalty: the seen table is ignored"


def test_seen_tokens_follow_each_reply_and_reuse_slots():
    table = SeenTokens()
    logits = torch.zeros(3, VOCAB)
    owners = [object() for _ in range(3)]
    replies: list[list[int]] = [[], [], []]
    prompts = [torch.tensor([1, 2, 2]), torch.tensor([5]), torch.tensor([7, 150])]  # 150: beyond the vocabulary
    rows = [(owners[0], prompts[0], replies[0]), None, (owners[2], prompts[2], replies[2])]
    seen = table.lookup(rows, logits)
    assert seen[0].nonzero().flatten().tolist() == [1, 2] and not seen[1].any()
    assert seen[2].nonzero().flatten().tolist() == [7]
    replies[0] += [9, 10]
    replies[2].append(11)
    seen = table.lookup(rows, logits)
    assert seen[0].nonzero().flatten().tolist() == [1, 2, 9, 10] and seen[2].nonzero().flatten().tolist() == [7, 11]
    table.release(owners[0])
    seen = table.lookup([(owners[1], prompts[1], replies[1]), rows[2]], logits[:2])
    assert seen[0].nonzero().flatten().tolist() == [5], "a reused slot starts clean"
    crowd = [(object(), torch.tensor([i]), []) for i in range(3 * INITIAL_SLOTS)]
    seen = table.lookup(crowd, torch.zeros(len(crowd), VOCAB))
    assert [row.nonzero().flatten().tolist() for row in seen] == [[i] for i in range(len(crowd))]
    assert table.held == 2 + len(crowd)


def test_a_penalised_greedy_row_in_a_batch_answers_as_generate_does(make_engine, loaded_tiny):
    """Through the engine, beside rows without a penalty: token for token what `generate` gives."""
    runner = loaded_tiny.runner
    penalised = SamplingParams(max_new_tokens=24, repetition_penalty=1.5)
    plain = SamplingParams(max_new_tokens=24)
    chats = [ask("What is in the image?", "scene.png"), ask("Read the total.", "receipt.png"),
             ask("Say hello without any image.")]
    expected = []
    for chat, params in zip(chats, [penalised, plain, penalised], strict=True):
        prompt = runner.encode(chat)
        with torch.inference_mode():
            out = runner.model.generate(**prompt.inputs, max_new_tokens=24, do_sample=False,
                                        repetition_penalty=params.repetition_penalty)
        expected.append(runner.tokenizer.decode(out[0, prompt.length:], skip_special_tokens=True))
    engine = make_engine(max_batch=4, started=False)
    streams = [engine.submit(chat, params) for chat, params in zip(chats, [penalised, plain, penalised], strict=True)]
    engine.start()
    assert [s.result(timeout=60) for s in streams] == expected
    assert max(s.stats.batch_size for s in streams) == 3
    unpenalised = make_engine(max_batch=1).submit(chats[0], plain).result(timeout=60)
    assert unpenalised != expected[0], "the penalty changed the answer (else this test proves nothing)"
    assert engine.sampler.held == 0, "finished rows give their slots back"


def test_one_gpu_call_applies_the_penalty_too(loaded_tiny):
    """ZeroGPU's whole-batch call samples with the same rules as the running engine."""
    runner = loaded_tiny.runner
    prompt = runner.encode(ask("What is in the image?", "scene.png"))
    with torch.inference_mode():
        out = runner.model.generate(**prompt.inputs, max_new_tokens=12, do_sample=False, repetition_penalty=1.5)
    params = [SamplingParams(max_new_tokens=12, repetition_penalty=1.5), SamplingParams(max_new_tokens=12)]
    events = list(decode_batch(runner, [prompt, prompt], params, seed=0, stop_token_ids=frozenset()))
    first_row = [token for step in events[:-1] for row, token in step if row == 0]
    assert first_row == out[0, prompt.length:].tolist()


def test_the_reply_cache_tells_penalised_greedy_replies_apart(make_engine):
    engine = make_engine(max_batch=2, cache_size=8)
    chat = ask("What is in the image?", "scene.png")
    plain = engine.submit(chat, SamplingParams(max_new_tokens=24)).result(timeout=60)
    penalised = engine.submit(chat, SamplingParams(max_new_tokens=24, repetition_penalty=1.5))
    assert penalised.result(timeout=60) != plain and not penalised.stats.from_cache
    again = engine.submit(chat, SamplingParams(max_new_tokens=24, repetition_penalty=1.5))
    assert again.result(timeout=60) == penalised.text and again.stats.from_cache
