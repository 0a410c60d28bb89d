"""`StopText`, the cut of a reply at its stop strings, fed a growing text as the engine streams it."""

from __future__ import annotations

from minicpmv_demo.web.stop_text import StopText


def test_the_start_of_a_stop_string_is_held_back_until_it_is_known():
    stop = StopText(("END",))
    assert stop.visible("abcE") == "abc" and stop.visible("abcEN") == "abc"
    assert stop.visible("abcENX") == "abcENX", "not the stop string after all: sent"
    assert stop.visible("abcENX EN") == "abcENX " and not stop.stopped
    assert stop.visible("abcENX END and more") == "abcENX " and stop.stopped
    assert stop.visible("abcENX END and more, later", ended=True) == "abcENX ", "the cut stays"


def test_the_earliest_of_several_stop_strings_cuts_even_across_updates():
    stop = StopText(("world", "lo w"))
    assert stop.visible("hel") == "he", "the last l may start 'lo w'"
    assert stop.visible("hello wor") == "hel" and stop.stopped, "'lo w' came whole, across two updates"


def test_a_held_end_is_sent_when_the_reply_ends():
    stop = StopText(("Observation:",))
    assert stop.visible("Thought: Obs") == "Thought: "
    assert stop.visible("Thought: Obs", ended=True) == "Thought: Obs" and not stop.stopped


def test_no_stop_strings_show_everything():
    assert StopText(()).visible("anything at all") == "anything at all"
