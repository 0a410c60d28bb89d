"""Who runs next, without a model: the scheduler reads only each request's length and settings."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from minicpmv_demo.engine.request import FinishReason, ReplyStream, SamplingParams
from minicpmv_demo.engine.scheduler import (PREFILL_PIECE_TOKENS, PREFILL_TOKEN_BUDGET, STEPS_TO_RECOVER_CEILING,
                                            Scheduler)
from minicpmv_demo.engine.sequence import Sequence, SequenceStatus


@dataclass
class Prompt:
    """What the scheduler reads of an encoded prompt: its length."""

    length: int
    thinking: bool = False

    @property
    def ids(self) -> torch.Tensor:
        return torch.zeros(self.length, dtype=torch.long)


def request(length: int = 10, max_new_tokens: int = 20) -> Sequence:
    return Sequence(stream=ReplyStream(), prompt=Prompt(length), params=SamplingParams(max_new_tokens=max_new_tokens),
                    decoder=None)


def line_of(count: int, **options) -> tuple[Scheduler, list[Sequence]]:
    scheduler = Scheduler(**options)
    sequences = [request() for _ in range(count)]
    for sequence in sequences:
        scheduler.add(sequence)
    return scheduler, sequences


def test_newcomers_fill_the_free_places_in_arrival_order():
    scheduler, sequences = line_of(5, max_batch=4)
    running = [request()]
    admitted = scheduler.schedule(running, None, can_split=True)
    assert admitted.newcomers == sequences[:3] and admitted.piecewise is None
    assert scheduler.queue_depth == 2
    assert scheduler.schedule(running + admitted.newcomers, None, can_split=True).newcomers == []
    assert scheduler.next_waiting() is sequences[3], "the first left waiting is next"


def test_a_prefill_is_admitted_only_while_its_memory_fits_what_is_free_now():
    free = [250]  # bytes free for prefills, as measured at each admission
    scheduler = Scheduler(max_batch=8, prefill_bytes=lambda rows, width: rows * width, headroom=lambda: free[0])
    first, second, third = request(length=100), request(length=100), request(length=100)
    for sequence in (first, second, third):
        scheduler.add(sequence)
    assert scheduler.schedule([], None, can_split=True).newcomers == [first, second], "a third would need 300"
    assert scheduler.schedule([first, second], None, can_split=True).newcomers == [third]
    big = request(length=400)
    scheduler.add(big)
    assert scheduler.schedule([first], None, can_split=False).newcomers == [], "400 > 250 free beside a running row"
    assert scheduler.schedule([], None, can_split=False).newcomers == [big], "an idle batch lets it try alone"
    free[0] = None  # the CPU: nothing is counted
    scheduler.add(request(length=10_000))
    assert len(scheduler.schedule([first], None, can_split=False).newcomers) == 1


def test_a_burst_is_prefilled_within_the_token_budget():
    width = PREFILL_TOKEN_BUDGET // 3  # three rows of this width fit; a fourth would not
    scheduler = Scheduler(max_batch=8)
    sequences = [Sequence(stream=ReplyStream(), prompt=Prompt(width), params=SamplingParams(), decoder=None)
                 for _ in range(4)]
    for sequence in sequences:
        scheduler.add(sequence)
    # One running row makes it crowded: a long prompt would go in pieces, so allow no split here.
    assert scheduler.schedule([request()], None, can_split=False).newcomers == sequences[:3]
    assert scheduler.queue_depth == 1


def test_a_long_prompt_arriving_while_others_run_is_prefilled_in_pieces_one_at_a_time():
    scheduler = Scheduler(max_batch=8)
    long_ones = [request(length=PREFILL_PIECE_TOKENS + 1) for _ in range(2)]
    short = request()
    for sequence in (*long_ones, short):
        scheduler.add(sequence)
    admitted = scheduler.schedule([request()], None, can_split=True)
    assert admitted.piecewise is long_ones[0] and admitted.newcomers == [], "the second long one waits"
    assert scheduler.next_waiting() is long_ones[1]
    alone = Scheduler(max_batch=8)
    alone.add(long_ones[1])
    assert alone.schedule([], None, can_split=True).newcomers == [long_ones[1]], "an idle batch prefills it whole"


def test_requests_whose_clients_left_are_ended_without_waiting_for_a_place():
    ended = []
    scheduler = Scheduler(max_batch=1, on_cancelled=ended.append)
    sequences = [request() for _ in range(3)]
    for sequence in sequences:
        scheduler.add(sequence)
    sequences[1].stream.cancel()
    scheduler.drop_cancelled()
    assert ended == [sequences[1]] and scheduler.queue_depth == 2
    sequences[0].stream.cancel()
    assert scheduler.next_waiting() is sequences[2] and ended == [sequences[1], sequences[0]]


def test_requeued_requests_go_back_to_the_front_in_order():
    scheduler, sequences = line_of(2, max_batch=4)
    taken = scheduler.schedule([], None, can_split=True).newcomers
    for sequence in taken:
        sequence.start()
    scheduler.add(request())
    scheduler.requeue_front(taken)
    assert [scheduler.next_waiting() for _ in range(2)] == sequences
    assert all(sequence.status == SequenceStatus.WAITING for sequence in sequences)


def test_running_out_of_memory_halves_the_ceiling_which_grows_back_slowly():
    scheduler = Scheduler(max_batch=8)
    scheduler.after_out_of_memory(running=0, newcomers=8)
    assert scheduler.ceiling == 4
    scheduler.after_out_of_memory(running=2, newcomers=3)
    assert scheduler.ceiling == 3, "the running rows keep their places; half of the newcomers join them"
    for _ in range(STEPS_TO_RECOVER_CEILING - 1):
        scheduler.after_step()
    assert scheduler.ceiling == 3
    scheduler.after_step()
    assert scheduler.ceiling == 4
    for _ in range(10 * STEPS_TO_RECOVER_CEILING):
        scheduler.after_step()
    assert scheduler.ceiling == 8, "never past --max-batch"


def test_a_cancelled_request_finishes_as_cancelled_through_the_callback():
    finished = []
    scheduler = Scheduler(max_batch=2, on_cancelled=lambda s: finished.append(s) or s.finish(FinishReason.CANCELLED,
                                                                                              None))
    sequence = request()
    scheduler.add(sequence)
    sequence.stream.cancel()
    assert scheduler.schedule([], None, can_split=True).newcomers == []
    assert finished == [sequence] and sequence.stream.stats.finish_reason == FinishReason.CANCELLED
