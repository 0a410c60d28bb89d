"""One user must never break another: bad settings, bad rows, heavy histories, waiting and
leaving clients. Engine-level tests on the tiny model, then the same through the launched app."""

from __future__ import annotations

import asyncio
import json
import math
import threading
from dataclasses import replace

import httpx
import pytest
import torch

from conftest import HeldRunner, ask, wait_until
from minicpmv_demo.intake.message import InputError
from minicpmv_demo.web.chat_service import ChatService
from minicpmv_demo.intake.conversation import PromptOptions, Turn
from minicpmv_demo.engine import ReplyError, SamplingParams
from minicpmv_demo.engine.sampling import sample_for
from minicpmv_demo.system.gpu import GpuMemory
from minicpmv_demo.model.minicpmv4.runner import MiniCPMV4Runner
from minicpmv_demo.web.server import build_app

GREEDY = SamplingParams(max_new_tokens=16)
QUESTIONS = [ask(f"Question number {i} about the picture?", name)
             for i, name in enumerate(["scene.png", "receipt.png", "chart.png", "diagram.png"] * 2)]


# -- sampling ------------------------------------------------------------------------------------
def devices() -> list[str]:
    return ["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"]


@pytest.mark.parametrize("device", devices())
def test_sampled_rows_use_a_generator_of_the_logits_device(device):
    """The engine builds its generator where the logits are; sampling must stay on that device
    (a CPU detour with a CUDA generator is refused by PyTorch)."""
    logits = torch.randn(4, 50, device=device)
    generator = torch.Generator(device=device).manual_seed(0)
    params = [SamplingParams(temperature=0.7, top_p=0.9), GREEDY, SamplingParams(temperature=1.0), GREEDY]
    first = sample_for(logits, params, generator).tokens
    assert all(isinstance(token, int) and 0 <= token < 50 for token in first)
    assert (first[1], first[3]) == (int(logits[1].argmax()), int(logits[3].argmax()))
    again = sample_for(logits, params, torch.Generator(device=device).manual_seed(0)).tokens
    assert again == first, "the same seed draws the same tokens"


def test_sampling_follows_the_distribution_and_top_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.2, 1e-9]])).repeat(4000, 1)
    generator = torch.Generator().manual_seed(1)
    tokens = sample_for(logits, [SamplingParams(temperature=1.0)] * 4000, generator).tokens
    shares = [tokens.count(i) / 4000 for i in range(4)]
    assert shares[0] == pytest.approx(0.5, abs=0.04) and shares[1] == pytest.approx(0.3, abs=0.04)
    top = sample_for(logits, [SamplingParams(temperature=1.0, top_p=0.6)] * 4000, generator).tokens
    assert set(top) == {0, 1}, "top-p 0.6 keeps the two likeliest tokens only"


def test_a_row_with_unusable_logits_fails_alone():
    logits = torch.randn(4, 30)
    logits[1, 3] = math.nan
    logits[2] = -math.inf
    sampled = sample_for(logits, [SamplingParams(temperature=0.7)] * 2 + [GREEDY] * 2,
                         torch.Generator().manual_seed(0))
    assert sampled.failed_rows == [1, 2]
    assert sampled.tokens[3] == int(logits[3].argmax()) and sampled.tokens[0] is not None


# -- the engine's door ---------------------------------------------------------------------------
@pytest.mark.parametrize("field, value", [
    ("temperature", math.nan), ("temperature", math.inf), ("temperature", -1.0), ("temperature", 2.5),
    ("top_p", math.nan), ("top_p", -1.0), ("top_p", 0.0), ("top_p", 1.5),
    ("max_new_tokens", 0), ("max_new_tokens", 2.5), ("max_new_tokens", math.nan),
    ("top_k", -1), ("top_k", 2.0), ("repetition_penalty", 0), ("repetition_penalty", math.inf),
])
def test_sampling_params_refuse_bad_values(field, value):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value})


def test_clients_clamp_finite_values_and_refuse_the_rest(make_engine, tiny_settings):
    service = ChatService(make_engine(started=False), tiny_settings, GpuMemory())
    assert service.params(10**9, -5, 42) == SamplingParams(max_new_tokens=tiny_settings.max_new_tokens,
                                                           temperature=0.0, top_p=1.0)
    for bad in ("nan", math.nan, math.inf, "-inf", "1e400", "abc", [1]):
        with pytest.raises(InputError, match="must be a"):
            service.params(16, bad, 1.0)
        with pytest.raises(InputError, match="must be a"):
            service.params(bad, 0.5, 1.0)
        with pytest.raises(InputError, match="must be a"):
            service.params(16, 0.5, 1.0, top_k=bad)
        with pytest.raises(InputError, match="must be a"):
            service.options(max_slice_nums=bad)
    assert service.params(16, 0.5, 1.0, top_k=-3, repetition_penalty=9) == SamplingParams(
        max_new_tokens=16, temperature=0.5, top_k=0, repetition_penalty=2.0)
    assert service.options(max_slice_nums=99, max_num_frames=0.4) == PromptOptions(max_slice_nums=36, max_num_frames=1)
    for bad in ({"enable_thinking": "yes"}, {"downsample_mode": "2x"}):
        with pytest.raises(InputError):
            service.options(**bad)


@pytest.mark.parametrize("field, value", [
    ("enable_thinking", "yes"), ("downsample_mode", "8x"), ("max_slice_nums", 0), ("max_slice_nums", 37),
    ("max_num_frames", 2.0), ("max_num_frames", True),
])
def test_prompt_options_refuse_bad_values(field, value):
    with pytest.raises(ValueError, match=field):
        PromptOptions(**{field: value})


# -- per-row isolation inside a step ------------------------------------------------------------------
class PoisonedModel:
    """The tiny model, except that the logits of every row whose prompt holds `marker` become
    NaN from the `after`-th decode step on: a row that goes bad mid-reply, as a broken kernel,
    a bad checkpoint slice or an overflow would make it."""

    def __init__(self, real, poisoned_rows: set[int], after: int = 3) -> None:
        self.real, self.poisoned_rows, self.after, self.steps = real, poisoned_rows, after, 0
        self.lm_head = self._head

    def __getattr__(self, name):
        return getattr(self.real, name)

    def _head(self, hidden):
        logits = self.real.lm_head(hidden)
        if hidden.shape[0] == 8:  # the full batch of the test
            self.steps += 1
            if self.steps > self.after:
                logits = logits.clone()
                logits[sorted(self.poisoned_rows)] = math.nan
        return logits


def test_a_row_gone_bad_mid_reply_fails_alone_and_the_batch_goes_on(make_engine, loaded_tiny):
    runner = loaded_tiny.runner
    solo = make_engine(max_batch=1)
    expected = [solo.submit(q, GREEDY).result(timeout=60) for q in QUESTIONS]
    solo.shutdown()
    engine = make_engine(MiniCPMV4Runner(PoisonedModel(runner.model, {2}), runner.processor), started=False,
                         max_batch=8)
    streams = [engine.submit(q, GREEDY) for q in QUESTIONS]
    engine.start()
    with pytest.raises(ReplyError, match="invalid numbers"):
        streams[2].result(timeout=60)
    assert [s.result(timeout=60) for i, s in enumerate(streams) if i != 2] == expected[:2] + expected[3:]
    assert engine.restarts == 0 and engine.alive
    assert wait_until(lambda: engine.state().batch_size == 0)


# -- long histories --------------------------------------------------------------------------------
class CountingRunner(MiniCPMV4Runner):
    """The tiny model's runner, counting how much text it was asked to encode or measure."""

    def __init__(self, runner: MiniCPMV4Runner) -> None:
        super().__init__(runner.model, runner.processor)
        self.encoded_turns = 0
        self.measured_turns = 0

    def encode(self, conversation):
        self.encoded_turns += len(conversation.turns)
        return super().encode(conversation)

    def turn_length(self, turn, options=PromptOptions()):
        self.measured_turns += 1
        return super().turn_length(turn, options)


def long_history(turns: int, chars: int) -> tuple[Turn, ...]:
    filler = ("the picture shows a house by the sea " * (chars // 37 + 1))[:chars]
    return tuple(Turn("user" if i % 2 == 0 else "assistant", f"{i}: {filler}") for i in range(turns))


def test_a_long_history_is_trimmed_with_one_encode_of_what_fits(make_engine, loaded_tiny):
    runner = CountingRunner(loaded_tiny.runner)
    engine = make_engine(runner, max_batch=2)
    conversation = ask("And now?", "scene.png", history=long_history(160, 4000))
    stream = engine.submit(conversation, GREEDY)
    assert stream.result(timeout=60)
    assert stream.notices and "left out" in stream.notices[0]
    kept = runner.encoded_turns
    assert kept < 10, "only the newest turns that fit are encoded"
    assert runner.measured_turns <= kept + 2, "turns older than what fits are not even measured"
    assert runner.encode(conversation.since(len(conversation.turns) - kept)).length <= runner.context_length


def test_a_long_prompt_is_prefilled_in_pieces_while_the_batch_goes_on(make_engine):
    """A chat that fills the context arrives while another reply streams: it is prefilled a piece at
    a time with decode steps for the other between pieces, and answers what it answers alone."""
    from minicpmv_demo.engine.scheduler import PREFILL_PIECE_TOKENS

    history = long_history(12, 1200)
    long_chats = [ask("And now?", history=history), ask("And this one?", "scene.png", history=history)]
    solo = make_engine(max_batch=1)
    expected = [solo.submit(chat, GREEDY).result(timeout=60) for chat in long_chats]
    assert solo.runner.encode(long_chats[0]).length > 4 * PREFILL_PIECE_TOKENS
    solo.shutdown()
    engine = make_engine(max_batch=4)
    running = engine.submit(QUESTIONS[0], SamplingParams(max_new_tokens=2000))
    assert wait_until(lambda: len(running.text.split()) > 2)
    for chat, reply in zip(long_chats, expected, strict=True):
        words_before = len(running.text.split())
        stream = engine.submit(chat, GREEDY)
        assert wait_until(lambda: stream.first_text_at is not None, timeout=30)
        assert len(running.text.split()) - words_before >= 3, "the running reply went on between the pieces"
        assert stream.result(timeout=60) == reply
    running.cancel()
    assert wait_until(lambda: engine.state().batch_size == 0)


def test_the_newest_message_alone_too_long_is_refused(make_engine, loaded_tiny):
    engine = make_engine(max_batch=1)
    too_long = ask("x " * 6000, history=long_history(4, 100))
    with pytest.raises(ReplyError, match="too long for the model"):
        engine.submit(too_long, GREEDY).result(timeout=10)


# -- through the app ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def served(tiny_settings, loaded_tiny):
    held = replace(loaded_tiny, runner=HeldRunner(loaded_tiny.runner))
    app = build_app(replace(tiny_settings, cache_size=0, max_new_tokens=1024, concurrency=8, queue_size=3),
                    held)
    _, url, _ = app.launch(server_port=None, quiet=True)
    yield app, url
    app.close()


def completion(url: str, body: dict | str, timeout: float = 60) -> httpx.Response:
    """POST a body (a dict, or raw JSON text for what `json.dumps` will not write, like 1e400)."""
    raw = body if isinstance(body, str) else json.dumps(body)
    return httpx.post(f"{url}v1/chat/completions", content=raw, timeout=timeout,
                      headers={"content-type": "application/json"})


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


@pytest.mark.parametrize("body, message", [
    ({"messages": user("hi"), "temperature": "nan"}, "temperature"),
    ({"messages": user("hi"), "temperature": "inf"}, "temperature"),
    ({"messages": user("hi"), "top_p": "nan"}, "top_p"),
    ('{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1e400}', "max new tokens"),
    ('{"messages": [{"role": "user", "content": "hi"}], "temperature": NaN}', "temperature"),
    ({"messages": user("hi"), "max_tokens": "NaN"}, "max new tokens"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": "data:x"}]}]}, "image_url"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": 5}}]}]}, "image_url"),
    ({"messages": [{"role": "system", "content": [{"type": "text", "text": 123}]}, *user("hi")]}, "string"),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": ["a"]}]}]}, "string"),
    ({"messages": user("x" * 2_000_000)}, "too long"),
    ({"messages": user("hi"), "n": 5}, "'n' must be 1"),
    ({"messages": user("hi"), "stream": "yes"}, "stream"),
    ({"messages": [*[{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}] * 250,
                   *user("hi")]}, "chat is too long"),
    ({"messages": "hi"}, "non-empty list"),
    ({"messages": [5]}, "role"),
])
def test_malformed_requests_get_400_with_a_message(served, body, message):
    _, url = served
    response = completion(url, body)
    assert response.status_code == 400, response.text
    assert message in response.json()["error"]["message"]


def test_invalid_json_is_400(served):
    _, url = served
    for raw in (b"{not json", b"[1, 2]", b"\xff\xfe"):
        response = httpx.post(f"{url}v1/chat/completions", content=raw, timeout=10,
                              headers={"content-type": "application/json"})
        assert response.status_code == 400 and response.json()["error"]["message"]


def test_a_nan_temperature_among_eight_requests_spoils_none_of_the_others(served, make_engine):
    app, url = served
    solo = make_engine(max_batch=1)
    expected = [solo.submit(ask(f"story {i}"), SamplingParams(max_new_tokens=24)).result(timeout=60)
                for i in range(7)]
    results: list = [None] * 8

    def send(i: int) -> None:
        body = {"messages": user(f"story {i}"), "max_tokens": 24, "temperature": 0}
        if i == 7:
            body["temperature"] = "nan"
        results[i] = completion(url, body)

    restarts = app.engine.restarts
    threads = [threading.Thread(target=send, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert [r.json()["choices"][0]["message"]["content"] for r in results[:7]] == expected
    assert results[7].status_code == 400 and "temperature" in results[7].json()["error"]["message"]
    assert app.engine.restarts == restarts


def test_the_page_refuses_a_nan_temperature_with_a_message(served):
    from gradio_client import Client

    _, url = served
    client = Client(url, verbose=False)
    try:
        with pytest.raises(Exception, match="temperature setting must be a finite number"):
            client.predict(message={"text": "hi", "files": []}, history=[], max_new_tokens=8,
                           temperature="nan", top_p=1, api_name="/chat")
        assert client.predict(message={"text": "and now?", "files": []}, history=[], max_new_tokens=8,
                              temperature=0, top_p=1, api_name="/chat")
    finally:
        client.close()


def test_a_160_turn_history_through_chat_is_answered(served):
    from gradio_client import Client

    _, url = served
    history = [{"role": t.role, "content": t.text} for t in long_history(160, 4000)]
    client = Client(url, verbose=False)
    try:
        reply = client.predict(message={"text": "and now?", "files": []}, history=history, max_new_tokens=8,
                               temperature=0, top_p=1, api_name="/chat")
        assert reply
    finally:
        client.close()


def test_a_non_streaming_request_is_cancelled_when_its_client_hangs_up(served):
    """1,024 tokens take the tiny model seconds; the client leaves after 1 s, the row soon after."""
    app, url = served
    with pytest.raises(httpx.ReadTimeout):
        completion(url, {"messages": user("a long story"), "max_tokens": 1024, "temperature": 0}, timeout=1.0)
    assert app.engine.state().batch_size == 1, "still generating when the client left"
    assert wait_until(lambda: app.engine.state().batch_size == 0, timeout=1.0), \
        "the row of a client that left must not go on generating"
    assert wait_until(lambda: app.service.gate.inside == 0, timeout=5)


def test_api_requests_share_the_limits_atomically_and_busy_is_503(served):
    """concurrency 8 and queue 3: of 20 requests at once, 8 run, 3 wait, 9 get 503 at once."""
    app, url = served

    async def burst() -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=120) as client:
            body = {"messages": user("tell me everything"), "max_tokens": 300, "temperature": 0}
            return await asyncio.gather(*(client.post(f"{url}v1/chat/completions", json=body)
                                          for _ in range(20)))

    peak = []
    watching = threading.Event()

    def watch() -> None:
        while not watching.wait(0.005):
            state = app.engine.state()
            peak.append(state.queue_depth + state.batch_size)

    threading.Thread(target=watch, daemon=True).start()
    responses = asyncio.run(burst())
    watching.set()
    codes = sorted(r.status_code for r in responses)
    assert codes == [200] * 11 + [503] * 9, codes
    busy = next(r for r in responses if r.status_code == 503)
    assert busy.headers["retry-after"] and "busy" in busy.json()["error"]["message"]
    assert max(peak) <= 8, "never more than --concurrency requests in the engine"
    assert wait_until(lambda: app.service.gate.inside == 0 and app.service.gate.waiting == 0)


def test_page_requests_count_against_the_api_limit(served):
    app, url = served
    pages = [app.service.submit({"text": f"page {i}", "files": []}, [], SamplingParams(max_new_tokens=1024))[0]
             for i in range(8)]
    try:
        waiting = [threading.Thread(target=completion, args=(url, {"messages": user("q"), "max_tokens": 4}))
                   for _ in range(3)]
        for thread in waiting:
            thread.start()
        assert wait_until(lambda: app.service.gate.waiting == 3)
        response = completion(url, {"messages": user("one more"), "max_tokens": 4})
        assert response.status_code == 503
    finally:
        for stream in pages:
            stream.cancel()
    for thread in waiting:
        thread.join(60)
    assert wait_until(lambda: app.service.gate.inside == 0)


def test_health_answers_while_many_non_streaming_requests_wait(served):
    """Waiting API requests hold no worker thread: /health and the page's config still answer
    while every place is taken and the model is held, so none of the requests can end."""
    app, url = served
    body = json.dumps({"messages": user("a long story"), "max_tokens": 200, "temperature": 0})
    gate, runner = app.service.gate, app.engine.runner

    async def load_and_probe() -> list[bool]:
        async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=None)) as client:
            load = [asyncio.create_task(client.post(f"{url}v1/chat/completions", content=body,
                                                    headers={"content-type": "application/json"}))
                    for _ in range(11)]
            while not (gate.inside == 8 and gate.waiting == 3):  # every place taken, 3 in line
                await asyncio.sleep(0.01)
            for _ in range(10):
                assert (await client.get(f"{url}health")).status_code == 200
                assert (await client.get(f"{url}config")).status_code == 200
            pending = [not task.done() for task in load]
            for task in load:
                task.cancel()
            return pending

    runner.go.clear()
    try:
        pending = asyncio.run(asyncio.wait_for(load_and_probe(), timeout=60))
    finally:
        runner.go.set()
    assert all(pending), "the probes were answered while every request still waited"
    assert wait_until(lambda: app.service.gate.inside == 0, timeout=10)
