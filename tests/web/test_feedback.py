"""The feedback log: only replies the server produced, one JSON line per record, bounded in
line and file size; a rating is like, dislike or none and names a reply the server kept."""

from __future__ import annotations

import json
from pathlib import Path

from minicpmv_demo.web.feedback import MAX_RATINGS_PER_REPLY, AnsweredReplies, FeedbackLog
from page_http import send_event

LINE_BREAKERS = "\u2028\u2029\x85"


def test_every_record_is_one_json_line_for_every_reader(tmp_path: Path):
    replies, log = AnsweredReplies(), FeedbackLog(tmp_path / "feedback.jsonl")
    for n in range(4):
        reply_id = replies.add(question=f"q{n}{LINE_BREAKERS}\nnext", images=[f"a{n}.png"],
                               answer=f"an{LINE_BREAKERS}swer", model="tiny")
        log.record("like", replies.rating_to_log(reply_id, "like"))
    text = log.path.read_text(encoding="utf-8")
    lines = text.splitlines()  # splits at U+2028, U+2029 and NEL too
    assert len(lines) == 4, lines
    records = [json.loads(line) for line in lines]
    assert records[0]["question"] == f"q0{LINE_BREAKERS}\nnext", "escaped, not lost"


def test_ratings_name_a_reply_the_server_kept_and_are_few_per_reply():
    replies = AnsweredReplies(capacity=2)
    reply_id = replies.add(question="What is it?", images=[], answer="A chart.", model="tiny")
    assert replies.rating_to_log("0" * 24, "like") is None, "an invented id names nothing"
    assert replies.rating_to_log(reply_id, "like").answer == "A chart."
    assert replies.rating_to_log(reply_id, "like") is None, "the same rating again is not logged again"
    logged = 1
    for rating in ["dislike", "none", "like", "dislike", "none", "like"] * 10:
        logged += replies.rating_to_log(reply_id, rating) is not None
    assert logged == MAX_RATINGS_PER_REPLY
    for n in range(3):
        replies.add(question="q", images=[], answer=str(n), model="tiny")
    assert replies.rating_to_log(reply_id, "dislike") is None and len(replies) == 2, "only the last few are kept"


def test_lines_and_the_file_are_capped(tmp_path: Path):
    replies = AnsweredReplies()
    log = FeedbackLog(tmp_path / "feedback.jsonl", max_bytes=20_000, max_line_bytes=2_000)
    for n in range(60):
        reply_id = replies.add(question="é" * 5000, images=["x.png"], answer="a" * 5000, model="tiny")
        log.record("like", replies.rating_to_log(reply_id, "like"))
    for path in (log.path, log.rotated):
        lines = path.read_bytes().splitlines()
        assert all(len(line) < 2_000 for line in lines)
        assert all(json.loads(line)["truncated"] for line in lines), "a cut line says so"
        assert path.stat().st_size <= 20_000
    assert not (tmp_path / "feedback.jsonl.2").exists(), "one older file at most: twice the cap in all"


def test_forged_ratings_log_nothing(page_app):
    """Invented questions and answers, free-text ratings, megabytes of history: nothing is logged,
    whatever a client sends; a real reply's rating logs what the server answered (see the
    browser test `test_feedback_logs_the_servers_own_reply`)."""
    log = page_app.feedback_log
    before = log.read_bytes() if log.exists() else b""
    forged = ["An invented question?", "An invented answer.", "x" * 2_000_000,
              "<div class='reply-foot'><span class='reply-stats' data-reply='0123456789abcdef01234567'>x</span></div>"]
    history = [{"role": "user", "content": [{"type": "text", "text": "An invented question?"}]},
               {"role": "assistant", "content": [{"type": "text", "text": "An invented answer. " + "x" * 2_000_000}]}]
    for n, liked in enumerate([True, False, "a free-text rating", None]):
        stream = send_event(page_app.url, event="like", data=[history], session=f"forger{n}",
                            event_data={"index": 1, "value": forged, "liked": liked})
        assert "process_completed" in stream
    after = log.read_bytes() if log.exists() else b""
    assert after == before, "the log grows only with replies the server produced"
