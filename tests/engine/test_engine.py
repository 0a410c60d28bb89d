"""Engine unit tests on the tiny model: batching, per-row settings, joins, leaves, faults, caching."""

from __future__ import annotations

import copy
import threading
from dataclasses import replace

import pytest
import torch

from conftest import OutOfMemoryModel, ask, run_concurrently, wait_until
from minicpmv_demo.web.chat_service import ChatService
from minicpmv_demo.engine import FinishReason, ReplyError, SamplingParams
from minicpmv_demo.system.gpu import GpuMemory
from minicpmv_demo.model.minicpmv4.runner import MiniCPMV4Runner

GREEDY = SamplingParams(max_new_tokens=24, temperature=0.0)
QUESTIONS = [
    ask("What is in the image?", "scene.png"),
    ask("Read the total.", "receipt.png"),
    ask("Which month is highest?", "chart.png"),
    ask("Explain the arrows.", "diagram.png"),
    ask("Compare the two pictures.", "chart.png", "scene.png"),
    ask("Say hello without any image."),
]


def reference_reply(runner: MiniCPMV4Runner, conversation, max_new_tokens: int) -> str:
    """What plain `model.generate` (greedy) answers: the ground truth for the engine's loop."""
    prompt = runner.encode(conversation)
    inputs = dict(prompt.inputs)
    with torch.inference_mode():
        out = runner.model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return runner.tokenizer.decode(out[0, prompt.length:], skip_special_tokens=True)


def test_solo_reply_matches_generate(make_engine, loaded_tiny):
    engine = make_engine(max_batch=1)
    for conversation in QUESTIONS[:3]:
        reply = engine.submit(conversation, GREEDY).result(timeout=60)
        assert reply == reference_reply(loaded_tiny.runner, conversation, GREEDY.max_new_tokens)
        assert len(reply.split()) >= 5


def test_concurrent_requests_batch_without_cross_talk(make_engine):
    solo = make_engine(max_batch=1)
    expected = [solo.submit(c, GREEDY).result(timeout=60) for c in QUESTIONS]
    solo.shutdown()
    engine = make_engine(max_batch=8)
    streams = [engine.submit(c, GREEDY) for c in QUESTIONS]
    replies = [s.result(timeout=60) for s in streams]
    assert replies == expected
    assert max(s.stats.batch_size for s in streams) > 1
    assert len(set(replies)) > 1  # different questions really got different answers


def test_each_row_keeps_its_own_settings(make_engine):
    engine = make_engine(max_batch=4)
    short = engine.submit(QUESTIONS[0], SamplingParams(max_new_tokens=3))
    long = engine.submit(QUESTIONS[1], SamplingParams(max_new_tokens=30))
    hot = engine.submit(QUESTIONS[2], SamplingParams(max_new_tokens=20, temperature=1.5, top_p=0.95))
    for stream in (short, long, hot):
        stream.result(timeout=60)
    assert (short.stats.tokens, short.stats.finish_reason) == (3, FinishReason.LENGTH)
    assert (long.stats.tokens, long.stats.finish_reason) == (30, FinishReason.LENGTH)
    # A sampled row may draw the stop token early; otherwise it runs to its own length.
    assert hot.text and (hot.stats.tokens == 20 or hot.stats.finish_reason == FinishReason.STOP)
    assert hot.stats.tokens <= 20


def test_rows_finish_on_their_own_eos(make_engine, loaded_tiny):
    """A copy of the tiny model whose EOS scores like one of its words: some replies now end early.

    Batched, every row must end exactly where it ends alone, while the others go on.
    """
    runner = loaded_tiny.runner
    word = make_engine(max_batch=1).submit(QUESTIONS[3], GREEDY).result(timeout=60).split()[5]
    model = copy.deepcopy(runner.model)
    with torch.no_grad():
        model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.clone())  # untie from the embeddings
        row = model.lm_head.weight[runner.tokenizer.convert_tokens_to_ids(word)]
        model.lm_head.weight[runner.tokenizer.eos_token_id] = row * 1.01
    eos_runner = MiniCPMV4Runner(model, runner.processor)
    solo = make_engine(eos_runner, max_batch=1)
    alone = [solo.submit(c, GREEDY) for c in QUESTIONS]
    expected = [(s.result(timeout=60), s.stats.finish_reason) for s in alone]
    solo.shutdown()
    assert {reason for _, reason in expected} == {FinishReason.STOP, FinishReason.LENGTH}
    batched = [make_engine(eos_runner, max_batch=8).submit(c, GREEDY) for c in QUESTIONS]
    assert [(s.result(timeout=60), s.stats.finish_reason) for s in batched] == expected
    for conversation, stream in zip(QUESTIONS, batched, strict=True):
        prompt = eos_runner.encode(conversation)
        with torch.inference_mode():
            ids = model.generate(**prompt.inputs, max_new_tokens=GREEDY.max_new_tokens, do_sample=False)
        shown = ids[0, prompt.length:].tolist()
        if runner.tokenizer.eos_token_id in shown:
            shown = shown[:shown.index(runner.tokenizer.eos_token_id)]
        assert stream.stats.tokens == len(shown), "a reply counts the tokens it showed, not its stop token"


def test_request_joins_a_running_batch_mid_generation(make_engine):
    params = SamplingParams(max_new_tokens=400)
    solo = make_engine(max_batch=1)
    expected_late = solo.submit(QUESTIONS[3], GREEDY).result(timeout=60)
    expected_early = solo.submit(QUESTIONS[0], params).result(timeout=120)
    solo.shutdown()
    engine = make_engine(max_batch=4)
    early = engine.submit(QUESTIONS[0], params)
    assert wait_until(lambda: len(early.text.split()) >= 20)
    late = engine.submit(QUESTIONS[3], GREEDY)
    assert late.result(timeout=60) == expected_late
    assert not early.done, "the newcomer had to wait for the long answer to finish"
    assert early.result(timeout=120) == expected_early
    assert late.stats.batch_size == 2


def test_cancel_frees_the_row_and_others_carry_on(make_engine):
    engine = make_engine(max_batch=4)
    params = SamplingParams(max_new_tokens=600)
    doomed, survivor = engine.submit(QUESTIONS[0], params), engine.submit(QUESTIONS[1], params)
    assert wait_until(lambda: bool(doomed.text))
    doomed.cancel()
    assert wait_until(lambda: doomed.done)
    assert doomed.stats.finish_reason == FinishReason.CANCELLED
    assert doomed.stats.tokens < 600
    assert not survivor.done, "the other request keeps going"
    survivor.result(timeout=60)
    assert wait_until(lambda: engine.state().batch_size == 0)


def test_coalesced_stream_delivers_the_end_at_once(make_engine):
    """A reader that coalesces tokens (the UI's stream interval) still sees the reply's end as
    soon as it happens, not at its next tick: the next request of that user waits on it."""
    engine = make_engine(max_batch=2)
    stream = engine.submit(QUESTIONS[1], SamplingParams(max_new_tokens=8))
    asked = []
    updates = stream.updates(interval=lambda: asked.append(1) or 3600.0)  # asked after each update
    first = next(updates)
    rest: list[str] = []
    reader = threading.Thread(target=lambda: rest.extend(updates))
    reader.start()
    reader.join(60)
    assert not reader.is_alive(), "the end waited for the hour-long coalescing tick"
    assert (rest[-1] if rest else first) == stream.result(timeout=5)
    assert asked or not rest, "the pace is asked again after every update but the last"


def test_streams_update_less_often_while_many_reply_at_once(make_engine, tiny_settings):
    """The server's budget of streamed updates is shared by the replies streaming at once."""
    engine = make_engine(max_batch=8)
    service = ChatService(engine, replace(tiny_settings, stream_interval=0.03, max_stream_updates=100),
                          GpuMemory())
    assert service.current_stream_interval() == pytest.approx(0.03)
    streams = [engine.submit(QUESTIONS[i % 5], SamplingParams(max_new_tokens=2000)) for i in range(8)]
    assert wait_until(lambda: engine.active_rows == 8)
    assert service.current_stream_interval() == pytest.approx(8 / 100)
    for stream in streams:
        stream.cancel()
    assert wait_until(lambda: engine.active_rows == 0)
    assert service.current_stream_interval() == pytest.approx(0.03)


def test_waiting_requests_are_prefilled_together_and_images_encoded_once(make_engine, loaded_tiny):
    runner = loaded_tiny.runner
    solo = make_engine(max_batch=1)
    expected = [solo.submit(c, GREEDY).result(timeout=60) for c in QUESTIONS]
    solo.shutdown()
    counting = OutOfMemoryModel(runner.model, max_rows=99)
    engine = make_engine(MiniCPMV4Runner(counting, runner.processor), started=False, max_batch=8)
    streams = [engine.submit(c, GREEDY) for c in QUESTIONS]
    engine.start()
    assert [s.result(timeout=60) for s in streams] == expected
    prefills = [rows for rows, length in counting.calls if length > 1]
    assert prefills == [len(QUESTIONS)], "requests waiting together are prefilled in one call"
    assert counting.vision_calls == sum(1 for c in QUESTIONS if c.images())
    again = engine.submit(ask("Another question about it?", "scene.png"), GREEDY)
    again.result(timeout=60)
    assert counting.vision_calls == sum(1 for c in QUESTIONS if c.images()), "scene.png was encoded before"


@pytest.mark.parametrize("phase", ["prefill", "step", "both"])
def test_out_of_memory_splits_the_batch_and_everyone_finishes(make_engine, loaded_tiny, caplog, phase):
    runner = loaded_tiny.runner
    solo = make_engine(max_batch=1)
    expected = [solo.submit(c, GREEDY).result(timeout=60) for c in QUESTIONS[:5]]
    solo.shutdown()
    flaky = OutOfMemoryModel(runner.model, max_rows=2, phase=phase)
    engine = make_engine(MiniCPMV4Runner(flaky, runner.processor), started=False, max_batch=8)
    streams = [engine.submit(c, GREEDY) for c in QUESTIONS[:5]]
    engine.start()
    assert [s.result(timeout=60) for s in streams] == expected
    assert flaky.refusals >= 1, "the engine never tried a batch that was too large"
    assert "out of memory" in caplog.text and "batch ceiling now" in caplog.text
    assert flaky.refusals <= 3, "the lowered ceiling must stop the engine from retrying what failed"
    assert engine.alive


def test_request_too_large_even_alone_gets_a_clear_error(make_engine, loaded_tiny):
    runner = loaded_tiny.runner
    big = ask("Compare them.", "chart.png", "scene.png", "receipt.png")
    limit = runner.encode(big).length - 1
    engine = make_engine(MiniCPMV4Runner(OutOfMemoryModel(runner.model, max_rows=8, max_prompt=limit),
                                      runner.processor), max_batch=4)
    fine, too_big = engine.submit(QUESTIONS[0], GREEDY), engine.submit(big, GREEDY)
    with pytest.raises(ReplyError, match="does not fit in the GPU memory"):
        too_big.result(timeout=60)
    assert fine.result(timeout=60)
    assert engine.submit(QUESTIONS[1], GREEDY).result(timeout=60)


def test_model_exception_fails_only_that_batch(make_engine, loaded_tiny):
    runner = loaded_tiny.runner

    class Broken(OutOfMemoryModel):
        fail_next = True

        def check(self, input_ids) -> None:
            if input_ids.shape[1] == 1 and Broken.fail_next:
                Broken.fail_next = False
                raise RuntimeError("expected all tensors to be on the same device")

    engine = make_engine(MiniCPMV4Runner(Broken(runner.model, max_rows=8), runner.processor), max_batch=4)
    with pytest.raises(ReplyError, match="try again"):
        engine.submit(QUESTIONS[0], GREEDY).result(timeout=60)
    assert engine.alive and engine.restarts == 1
    assert engine.submit(QUESTIONS[1], GREEDY).result(timeout=60)


def test_a_broken_device_stops_the_engine_for_a_restart(make_engine, loaded_tiny):
    """A sticky CUDA error (an illegal memory access) poisons the device: every later call would
    fail. The engine fails what it holds and what waits, stops (its state says down), calls
    `on_fatal` (the server exits so its supervisor restarts it), and is never restarted in place."""
    runner = loaded_tiny.runner

    class Broken(OutOfMemoryModel):
        def check(self, input_ids) -> None:
            if input_ids.shape[1] == 1:
                raise RuntimeError("CUDA error: an illegal memory access was encountered")

    reasons = []
    engine = make_engine(MiniCPMV4Runner(Broken(runner.model, max_rows=8), runner.processor), max_batch=1,
                         started=False, on_fatal=reasons.append)
    running, waiting = engine.submit(QUESTIONS[0], GREEDY), engine.submit(QUESTIONS[1], GREEDY)
    engine.start()
    for stream in (running, waiting):
        with pytest.raises(ReplyError, match="GPU failed"):
            stream.result(timeout=60)
    assert wait_until(lambda: not engine.alive) and not engine.state().alive
    assert reasons and "illegal memory access" in reasons[0] and engine.restarts == 0
    late = engine.submit(QUESTIONS[2], GREEDY)
    with pytest.raises(ReplyError, match="GPU failed"):
        late.result(timeout=5)
    assert not engine.alive, "no restart in place: the process is to be restarted"


def test_a_burst_is_prefilled_in_groups_that_fit_the_free_memory(make_engine, loaded_tiny):
    """With room for two rows' prefill at a time, five requests arriving together are prefilled
    two by two; each is answered and the batch still grows past two (the slots are there)."""
    runner = CountingPrefills(loaded_tiny.runner)
    width = runner.encode(QUESTIONS[0]).length
    engine = make_engine(runner, max_batch=8, started=False, headroom=lambda: int(runner.prefill_bytes(2, width) * 1.2))
    streams = [engine.submit(QUESTIONS[0], GREEDY) for _ in range(5)]
    engine.start()
    for stream in streams:
        stream.result(timeout=60)
    assert max(runner.rows_per_prefill) == 2 and sum(runner.rows_per_prefill) == 5
    assert max(s.stats.batch_size for s in streams) > 2


class CountingPrefills(MiniCPMV4Runner):
    """The tiny model's runner, counting the rows of each prefill."""

    def __init__(self, runner: MiniCPMV4Runner) -> None:
        super().__init__(runner.model, runner.processor)
        self.rows_per_prefill: list[int] = []

    def prefill(self, prompts, generated):
        self.rows_per_prefill.append(len(prompts))
        return super().prefill(prompts, generated)


def test_identical_greedy_request_is_answered_from_cache(make_engine):
    engine = make_engine(max_batch=4, cache_size=8)
    first = engine.submit(QUESTIONS[0], GREEDY)
    text = first.result(timeout=60)
    again = engine.submit(ask("What is in the image?", "scene.png"), GREEDY)
    assert again.result(timeout=5) == text and again.stats.from_cache
    sampled = engine.submit(QUESTIONS[0], SamplingParams(max_new_tokens=24, temperature=0.9))
    sampled.result(timeout=60)
    assert not sampled.stats.from_cache


def test_long_chat_drops_oldest_turns_with_notice(make_engine, loaded_tiny):
    from minicpmv_demo.intake.conversation import Turn

    runner = loaded_tiny.runner
    filler = " ".join(["the picture shows a house"] * 300)
    history = tuple(t for _ in range(3) for t in (Turn("user", filler), Turn("assistant", filler)))
    conversation = ask("And now?", "scene.png", history=history)
    original = runner.context_length
    runner.context_length = runner.encode(conversation).length - 500
    try:
        stream = make_engine(max_batch=2).submit(conversation, GREEDY)
        assert stream.result(timeout=60)
        assert stream.notices and "left out" in stream.notices[0]
    finally:
        runner.context_length = original


def test_many_threads_submitting_at_once(make_engine):
    engine = make_engine(max_batch=8)
    replies = run_concurrently(lambda i: engine.submit(QUESTIONS[i % len(QUESTIONS)], GREEDY).result(timeout=120), 16)
    assert replies == [replies[i % len(QUESTIONS)] for i in range(16)]


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # the crash is the test
def test_a_dead_engine_thread_is_restarted_on_the_next_request(make_engine):
    engine = make_engine(max_batch=2)

    def die():
        raise SystemExit("simulated crash of the engine thread")  # not caught by the loop

    engine._admit = die
    first = engine.submit(QUESTIONS[0], GREEDY)
    assert wait_until(lambda: not engine.alive)
    del engine._admit
    second = engine.submit(QUESTIONS[1], GREEDY)
    assert second.result(timeout=60) and first.result(timeout=60)
    assert engine.alive and engine.restarts == 1


def test_the_engine_and_the_runner_import_without_pyav_or_gradio():
    """A lent GPU machine has neither: the GPU check imports the engine and the model there."""
    import subprocess
    import sys

    code = ("import sys; import minicpmv_demo.engine, minicpmv_demo.model.loading, "
            "minicpmv_demo.model.minicpmv4.published_shape; "
            "print(sorted(m for m in ('av', 'gradio', 'fastapi') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True,
                          cwd=__import__("pathlib").Path(__file__).resolve().parents[2])
    assert done.stdout.strip() == "[]"


def test_slots_that_cannot_fit_are_one_line_saying_what_to_lower(loaded_tiny):
    from minicpmv_demo.engine.start import EngineStartError, allocate_slots

    runner = loaded_tiny.runner
    with pytest.raises(EngineStartError) as refused:
        allocate_slots(runner, 64, 32768, capture=False, usable=100 * 2**20)
    message = str(refused.value)
    assert "\n" not in message and "--max-model-len" in message and "--max-batch 64" in message
    assert f"{runner.slot_bytes(64, 32768) / 2**20:,.0f} MB" in message
