"""Splitting a streamed reply into reasoning and answer."""

from minicpmv_demo.engine.reasoning import ReplyParts, split_reasoning


def test_a_prompt_that_opened_think_starts_the_reply_in_reasoning():
    assert split_reasoning("Let me look", True) == ReplyParts("Let me look", "", False)
    assert split_reasoning("Let me look.</thi", True) == ReplyParts("Let me look.", "", False)
    assert split_reasoning("Let me look.\n</think>\n\nA cat.", True) == ReplyParts("Let me look.", "A cat.", True)


def test_a_reply_without_reasoning_is_all_answer():
    assert split_reasoning("A cat.", False) == ReplyParts(None, "A cat.", True)
    assert split_reasoning("A cat </think> sat", False) == ReplyParts(None, "A cat </think> sat", True)


def test_a_reply_may_open_the_block_itself():
    assert split_reasoning("<th", False) == ReplyParts(None, "", False)
    assert split_reasoning("<think>hmm", False) == ReplyParts("hmm", "", False)
    assert split_reasoning("<think>hmm</think>A dog.", False) == ReplyParts("hmm", "A dog.", True)
