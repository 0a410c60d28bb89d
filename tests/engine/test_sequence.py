"""What a running request holds and how it takes its tokens, without a model (the tiny model's
tokenizer only)."""

from __future__ import annotations

import pytest
import torch

from minicpmv_demo.engine.detokenizer import IncrementalDecoder
from minicpmv_demo.engine.reasoning_budget import ReasoningBudget, reasoning_tags
from minicpmv_demo.engine.request import FinishReason, ReplyError, ReplyStream, SamplingParams
from minicpmv_demo.engine.sequence import FAILED_MESSAGE, INVALID_OUTPUT_MESSAGE, Sequence, SequenceStatus
from minicpmv_demo.model.minicpmv4.tiny import build_word_tokenizer


class Prompt:
    length, thinking = 4, False
    ids = torch.zeros(4, dtype=torch.long)


@pytest.fixture(scope="module")
def tokenizer():
    return build_word_tokenizer()


def sequence_for(tokenizer, max_new_tokens: int = 5, reasoning: ReasoningBudget | None = None) -> Sequence:
    return Sequence(stream=ReplyStream(), prompt=Prompt(), params=SamplingParams(max_new_tokens=max_new_tokens),
                    decoder=IncrementalDecoder(tokenizer), reasoning=reasoning)


def ids(tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False)


def test_tokens_become_text_and_the_length_limit_ends_the_reply(tokenizer):
    sequence = sequence_for(tokenizer, max_new_tokens=3)
    for token in ids(tokenizer, "the house is"):
        sequence.take(token, frozenset())
    assert sequence.stream.text.split() == ["the", "house", "is"]
    assert sequence.finish_reason == FinishReason.LENGTH and sequence.length == 4 + 3


def test_a_stop_token_ends_the_reply_without_becoming_text(tokenizer):
    stop = tokenizer.eos_token_id
    sequence = sequence_for(tokenizer)
    sequence.take(ids(tokenizer, "house")[0], frozenset({stop}))
    sequence.take(stop, frozenset({stop}))
    assert sequence.finish_reason == FinishReason.STOP
    assert sequence.generated == ids(tokenizer, "house") and sequence.stream.text.strip() == "house"


def test_unusable_logits_fail_this_request_alone(tokenizer):
    sequence = sequence_for(tokenizer)
    sequence.take(None, frozenset())
    assert sequence.finish_reason == FinishReason.ERROR and sequence.status == SequenceStatus.FINISHED
    with pytest.raises(ReplyError, match="invalid numbers"):
        sequence.stream.result(timeout=1)
    assert INVALID_OUTPUT_MESSAGE.startswith("The model produced invalid numbers")


def test_a_token_the_detokenizer_cannot_take_fails_this_request_with_a_message(tokenizer):
    sequence = sequence_for(tokenizer)
    sequence.take(2**40, frozenset())  # no id this large: decoding it raises
    assert sequence.finish_reason == FinishReason.ERROR
    with pytest.raises(ReplyError) as raised:
        sequence.stream.result(timeout=1)
    assert str(raised.value) == FAILED_MESSAGE


def test_a_spent_reasoning_budget_closes_the_reasoning_and_says_so(tokenizer):
    tags = reasoning_tags(tokenizer)
    sequence = sequence_for(tokenizer, max_new_tokens=10, reasoning=ReasoningBudget(tags, limit=2,
                                                                                   opened_in_prompt=True))
    for token in ids(tokenizer, "the house is by the sea"):
        sequence.take(token, frozenset())
    assert sequence.generated[2] == tags.close_id, "the third token closes the reasoning"
    assert sequence.stream.notices and "Reasoning was cut at 2 tokens" in sequence.stream.notices[0]


def test_finish_ends_the_stream_with_its_stats(tokenizer):
    sequence = sequence_for(tokenizer)
    sequence.start()
    sequence.take(ids(tokenizer, "house")[0], frozenset())
    sequence.largest_batch = 3
    sequence.finish(FinishReason.STOP, peak_memory_mb=12.5)
    stats = sequence.stream.stats
    assert (stats.tokens, stats.batch_size, stats.peak_memory_mb, stats.finish_reason) == (1, 3, 12.5,
                                                                                            FinishReason.STOP)
    assert sequence.status == SequenceStatus.FINISHED and sequence.stream.done


def test_a_cancelled_request_is_marked_for_release(tokenizer):
    sequence = sequence_for(tokenizer)
    sequence.mark_cancelled()
    assert sequence.finish_reason is None
    sequence.stream.cancel()
    sequence.mark_cancelled()
    assert sequence.finish_reason == FinishReason.CANCELLED
