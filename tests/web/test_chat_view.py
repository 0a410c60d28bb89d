"""What the page adds to a chat besides the user's words and the answer (reasoning, stats,
error notes) is display only, and what Stop and the feedback log keep."""

from __future__ import annotations

import json
from pathlib import Path

from minicpmv_demo.intake.message import InputRules, build_conversation
from minicpmv_demo.engine import ReplyStats, ReplyStream
from minicpmv_demo.engine.request import FinishReason
from minicpmv_demo.web.feedback import FeedbackLog
from minicpmv_demo.intake.images import ImageLimits
from minicpmv_demo.web.chat_view import (LiveReplies, ReplyView, error_note, question_before, split_last_user_turn,
                                   stats_caption, user_bubbles)

RULES = InputRules(image_limits=ImageLimits(), max_images=4, allowed_roots=("/nonexistent",))


def test_reasoning_stats_and_error_notes_never_reach_the_model():
    view = ReplyView(thinking=True)
    streaming = view.messages("Let me look at the pict")
    assert streaming == [{"role": "assistant", "content": "Let me look at the pict",
                          "metadata": {"title": "Thinking", "status": "pending"}}], "reasoning only, still open"
    reply = view.messages("Let me look.</think>It is a chart.")
    assert reply[0]["metadata"]["status"] == "done" and "duration" in reply[0]["metadata"]
    assert reply[1] == {"role": "assistant", "content": "It is a chart."}
    stats = ReplyStats(tokens=5, seconds=0.5, batch_size=1, peak_memory_mb=None, finish_reason=FinishReason.STOP)
    history = [*user_bubbles("What is it?"), *reply, stats_caption("batch 1 · 10.0 tok/s", stats),
               *user_bubbles("Again?"), error_note("out of memory")]
    conversation, _ = build_conversation("And now?", history, system_prompt="", rules=RULES)
    assert [(t.role, t.text) for t in conversation.turns] == [
        ("user", "What is it?"), ("assistant", "It is a chart."), ("user", "Again?\nAnd now?")]


def test_a_reply_that_opens_think_itself_is_split_too():
    parts = ReplyView(thinking=False).messages("<think>hmm</think>Yes.")
    assert parts[0]["metadata"]["title"] == "Thinking" and parts[1]["content"] == "Yes."
    assert ReplyView(thinking=False).messages("Plain answer") == [{"role": "assistant", "content": "Plain answer"}]


def test_captions_say_stopped_or_cut():
    cut = ReplyStats(tokens=9, seconds=1, batch_size=1, peak_memory_mb=None, finish_reason=FinishReason.LENGTH)
    assert "reached max new tokens" in stats_caption("x", cut)["content"]
    assert "■ stopped" in stats_caption("x", None, stopped=True)["content"]
    assert "<b>" not in stats_caption("<b>bold</b>", None)["content"], "caption text is escaped"


def test_stop_before_the_reply_starts_is_kept_for_it():
    live = LiveReplies()
    assert live.stop("tab", wait_s=0) is None
    assert live.stopped_early("tab") and not live.stopped_early("tab"), "used once"
    stream = ReplyStream()
    live.start("tab", stream, ReplyView(False), [])
    stream.finish(ReplyStats(tokens=1, seconds=0.1, batch_size=1, peak_memory_mb=None,
                             finish_reason=FinishReason.CANCELLED))
    stopped = live.stop("tab", wait_s=1)
    assert stopped is not None and stopped[0].cancelled and not live.stopped_early("other")
    # Undo and Clear cancel what runs; with nothing running they must not refuse the next question.
    assert live.stop("tab", wait_s=0, early=False) is None and not live.stopped_early("tab")


def test_edit_and_feedback_find_the_whole_question(tmp_path: Path):
    history = [{"role": "user", "content": {"path": "/up/a.png"}}, {"role": "user", "content": "What is it?"},
               {"role": "assistant", "content": "A chart."}]
    earlier, message = split_last_user_turn(history)
    assert earlier == [] and message == {"text": "What is it?", "files": ["/up/a.png"]}
    assert question_before(history, 2) == ("What is it?", ["a.png"])
    log = FeedbackLog(tmp_path / "sub" / "feedback.jsonl")
    log.record(rating="dislike", question="What is it?", answer="A chart.", images=["a.png"], model="tiny")
    line = json.loads(log.path.read_text())
    assert line["rating"] == "dislike" and line["images"] == ["a.png"] and line["time"].endswith("Z")
