"""What the page adds to a chat besides the user's words and the answer (reasoning, the foot
line under a reply, notes) is display only; the foot names the reply a rating refers to."""

from __future__ import annotations

from minicpmv_demo.engine import ReplyStats
from minicpmv_demo.engine.request import FinishReason
from minicpmv_demo.intake.images import ImageLimits
from minicpmv_demo.intake.message import InputRules, build_conversation
from minicpmv_demo.web.chat_view import (ReplyView, error_note, reply_id_of, split_last_user_turn, stats_foot,
                                         user_bubbles, waiting_note)

RULES = InputRules(image_limits=ImageLimits(), max_images=4, allowed_roots=("/nonexistent",))


def stats(reason: FinishReason, tokens: int = 5) -> ReplyStats:
    return ReplyStats(tokens=tokens, seconds=0.5, batch_size=1, peak_memory_mb=None, finish_reason=reason)


def test_reasoning_feet_and_notes_never_reach_the_model():
    view = ReplyView(thinking=True)
    streaming = view.messages("Let me look at the pict")
    assert streaming == [{"role": "assistant", "content": "Let me look at the pict",
                          "metadata": {"title": "Thinking", "status": "pending"}}], "reasoning only, still open"
    reply = view.messages("Let me look.</think>It is a chart.")
    assert reply[0]["metadata"]["status"] == "done" and "duration" in reply[0]["metadata"]
    assert reply[1] == {"role": "assistant", "content": "It is a chart."}
    history = [*user_bubbles("What is it?"), *reply, stats_foot("batch 1 · 10.0 tok/s", stats(FinishReason.STOP), "ab" * 8),
               *user_bubbles("Again?"), waiting_note(2), error_note("out of memory")]
    conversation, _ = build_conversation("And now?", history, system_prompt="", rules=RULES)
    assert [(t.role, t.text) for t in conversation.turns] == [
        ("user", "What is it?"), ("assistant", "It is a chart."), ("user", "Again?\nAnd now?")]


def test_a_reply_that_opens_think_itself_is_split_too():
    parts = ReplyView(thinking=False).messages("<think>hmm</think>Yes.")
    assert parts[0]["metadata"]["title"] == "Thinking" and parts[1]["content"] == "Yes."
    assert ReplyView(thinking=False).messages("Plain answer") == [{"role": "assistant", "content": "Plain answer"}]


def test_the_foot_says_stopped_cut_or_ran_out_while_thinking_and_names_the_reply():
    assert "reached max new tokens" in stats_foot("x", stats(FinishReason.LENGTH), None)["content"]
    assert "■ stopped" in stats_foot("x", stats(FinishReason.CANCELLED), None)["content"]
    thinking = stats_foot("x", stats(FinishReason.LENGTH), None, thinking_only=True)["content"]
    assert "stopped while thinking (token limit)" in thinking
    assert "&lt;b&gt;" in stats_foot("<b>bold</b>", None, None)["content"], "the stats text is escaped"
    rated = stats_foot("x", stats(FinishReason.STOP), "0123456789abcdef")
    assert reply_id_of(["an answer", rated["content"]]) == "0123456789abcdef"
    assert "act-like" in rated["content"] and "act-like" not in error_note("failed")["content"], \
        "a reply without an id offers no rating"
    assert reply_id_of(["an answer", "<span data-reply='../../etc'>x</span>"]) is None


def test_a_reply_that_ended_inside_its_reasoning_is_known():
    view = ReplyView(thinking=True)
    assert view.thinking_only("still thinking about it") and not view.thinking_only("hm</think>An answer.")
    assert view.answer("hm</think>An answer.") == "An answer."


def test_the_waiting_note_says_the_place():
    assert "you are next" in waiting_note(0)["content"] and "3 ahead" in waiting_note(3)["content"]
    assert "answering" in waiting_note(None)["content"]


def test_retry_and_edit_find_the_whole_last_question():
    history = [{"role": "user", "content": {"path": "/up/a.png"}}, {"role": "user", "content": "What is it?"},
               {"role": "assistant", "content": "A chart."}, stats_foot("x", None, None)]
    earlier, message = split_last_user_turn(history)
    assert earlier == [] and message == {"text": "What is it?", "files": ["/up/a.png"]}
    assert split_last_user_turn([]) == ([], None)


def test_forged_chats_and_choices_are_read_without_failing():
    """What a client sends in place of the page's own chat, saved chats or example: read as far
    as it makes sense, never an exception (a 500 and a traceback in the log)."""
    from types import SimpleNamespace

    from minicpmv_demo.web.page_events import chat_choices, example_message
    from minicpmv_demo.web.saved_chats import MAX_PARTS, restored_chat

    assert split_last_user_turn([5, {"role": "user"}, {"role": "user", "content": {"component": "x"}}]) == ([], None)
    assert split_last_user_turn("not a chat") == ([], None)
    assert chat_choices({"chats": [1, ["t"], ["title", "id1"], ["t", ["x"]]], "current": ["id1"]})["value"] is None
    assert chat_choices({"chats": [["title", "id1"]], "current": "id1"})["choices"] == [("title", "id1")]
    assert example_message(SimpleNamespace(value="text")) == {"text": "", "files": []}
    assert example_message(SimpleNamespace(value={"text": "hi", "files": [{"no": "path"}, "a.png"]})) == \
        {"text": "hi", "files": ["a.png"]}
    parts = ["a"] * 100_000 + [{"path": "/etc/passwd\0"}]  # one saved message split in 100,001 parts
    restored = restored_chat([{"role": "user", "content": parts}], RULES)
    assert len(restored) == MAX_PARTS and all(m["content"] == "a" for m in restored)
    assert restored_chat([{"role": "user", "content": [{"path": "/tmp/\0nul"}]}], RULES)[0]["metadata"]
