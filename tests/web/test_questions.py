"""Stop names a question: it cancels that question's answer and nothing else, in any order."""

from __future__ import annotations

from minicpmv_demo.engine import ReplyStream
from minicpmv_demo.web.questions import LiveQuestions


def test_stop_cancels_only_the_question_it_names():
    questions = LiveQuestions()
    mine, other = ReplyStream(), ReplyStream()
    questions.start(("tab", "q1"), mine)
    questions.start(("tab", "q2"), other)
    questions.stop(("tab", "q1"))
    assert mine.cancelled and not other.cancelled
    questions.stop(("another tab", "q2"))
    assert not other.cancelled, "a page can only stop its own questions"


def test_a_stop_before_the_answer_starts_is_kept_for_that_question_alone():
    questions = LiveQuestions()
    questions.stop(("tab", "early"))
    assert questions.stopped_before_start(("tab", "early"))
    assert not questions.stopped_before_start(("tab", "the next one")), "never for the next question"
    late = ReplyStream()
    questions.start(("tab", "early"), late)  # its answer began while the stop was on its way
    assert late.cancelled


def test_a_stop_after_the_answer_ended_does_nothing():
    questions = LiveQuestions()
    stream = ReplyStream()
    questions.start(("tab", "done"), stream)
    questions.end(("tab", "done"))
    questions.stop(("tab", "done"))  # a double click, or a press as the answer ended
    assert not questions.stopped_before_start(("tab", "done")) and not stream.cancelled
    assert not questions.busy("tab")


def test_what_it_remembers_is_bounded():
    questions = LiveQuestions(remembered=3)
    for n in range(10):
        questions.stop(("tab", f"q{n}"))
        questions.end(("tab", f"e{n}"))
    assert not questions.stopped_before_start(("tab", "q0")) and questions.stopped_before_start(("tab", "q9"))


def test_questions_waiting_for_their_answer_are_bounded_in_size():
    from minicpmv_demo.web.questions import WaitingQuestion, WaitingQuestions

    waiting = WaitingQuestions(max_chars=1000)
    question = WaitingQuestion(message={"text": "q", "files": []}, history=[], shown=[], size=400)
    for n in range(5):  # asked, and their answers never let run
        waiting.put(("tab", f"q{n}"), question)
    assert len(waiting) == 2, "the oldest are forgotten past the bound"
    assert waiting.take(("tab", "q4")) is question and waiting.take(("tab", "q4")) is None, "taken once"
    assert waiting.take(("tab", "q0")) is None


def test_only_ids_the_page_makes_name_a_question():
    from minicpmv_demo.web.questions import question_key

    assert question_key("tab", "0123456789abcdef01234567") == ("tab", "0123456789abcdef01234567")
    for forged in ("", "q1", "x" * 10_000, "0123456789ABCDEF01234567", None, 5, ["a"]):
        assert question_key("tab", forged) is None, forged


def test_a_session_is_busy_from_the_answers_start_to_its_end():
    questions = LiveQuestions()
    assert questions.begin(("tab", "q1"))  # being prepared: no stream yet
    assert not questions.begin(("tab", "q1")), "a second answer to it leaves the first alone"
    assert questions.busy("tab") and not questions.busy("another tab") and questions.known(("tab", "q1"))
    questions.stop(("tab", "q1"))  # a Stop while it is prepared is kept for it
    stream = ReplyStream()
    questions.start(("tab", "q1"), stream)
    assert stream.cancelled
    questions.drop(("tab", "q1"))  # it streams: only an answer not yet started is dropped
    assert questions.busy("tab")
    questions.end(("tab", "q1"))
    assert not questions.busy("tab") and questions.known(("tab", "q1"))
    assert questions.begin(("tab", "q2"))
    questions.drop(("tab", "q2"))  # nothing to answer after all
    assert not questions.busy("tab") and not questions.known(("tab", "q2"))


def test_waiting_questions_are_bounded_in_number_and_age():
    from minicpmv_demo.web.questions import WaitingQuestion, WaitingQuestions

    waiting = WaitingQuestions(max_questions=3, max_age=60)
    for n in range(5):
        waiting.put(("flood", f"q{n}"), WaitingQuestion(message={}, history=[], shown=[], size=1, at=100.0 + n))
    assert len(waiting) == 3 and waiting.take(("flood", "q0")) is None
    assert waiting.waiting("flood") and not waiting.waiting("visitor")
    waiting.put(("visitor", "late"), WaitingQuestion(message={}, history=[], shown=[], size=1, at=1000.0))
    assert len(waiting) == 1, "questions waiting past max_age (their tab closed) are forgotten"
    assert waiting.take(("visitor", "late")) is not None
