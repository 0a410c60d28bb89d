"""The OpenAI-compatible routes, driven by the official `openai` client, on the same engine."""

from __future__ import annotations

import base64
import json
import threading
from dataclasses import replace
from pathlib import Path

import httpx
import pytest
from gradio_client import Client, handle_file

from conftest import HeldRunner, wait_until
from minicpmv_demo.engine import SamplingParams
from minicpmv_demo.web.server import build_app

openai = pytest.importorskip("openai")
ASSETS = Path(__file__).resolve().parents[2] / "assets"


def data_url(name: str) -> str:
    return "data:image/png;base64," + base64.b64encode((ASSETS / name).read_bytes()).decode()


@pytest.fixture(scope="module")
def served(tiny_settings, loaded_tiny):
    held = replace(loaded_tiny, runner=HeldRunner(loaded_tiny.runner))
    app = build_app(replace(tiny_settings, cache_size=0, max_new_tokens=1024, auth="ann:pw"), held)
    _, url, _ = app.launch(server_port=None, quiet=True)
    yield app, url
    app.close()


def client_for(url: str, key: str = "pw"):
    return openai.OpenAI(base_url=f"{url}v1", api_key=key, max_retries=0)


def ask(text: str, image: str) -> list[dict]:
    return [{"role": "system", "content": "Be brief."},
            {"role": "user", "content": [{"type": "text", "text": text},
                                         {"type": "image_url", "image_url": {"url": data_url(image)}}]}]


def test_models_and_auth(served):
    _, url = served
    assert [m.id for m in client_for(url).models.list()] == ["tiny"]
    with pytest.raises(openai.AuthenticationError):
        client_for(url, key="wrong").models.list()


def test_completion_plain_and_streamed_agree(served):
    """The streamed reply is the plain one, arrives in pieces as it is made, and ends with [DONE].

    The model is held after its first token until that token has reached the client, so the
    pieces do not depend on how fast this machine generates."""
    app, url = served
    done = client_for(url).chat.completions.create(model="tiny", messages=ask("What is this?", "chart.png"),
                                                   max_tokens=20, temperature=0)
    text = done.choices[0].message.content
    assert text and done.choices[0].finish_reason in ("stop", "length") and done.usage.completion_tokens > 0
    body = {"model": "tiny", "messages": ask("What is this?", "chart.png"), "max_tokens": 20, "temperature": 0,
            "stream": True}
    runner = app.engine.runner
    runner.go.clear()
    events: list[str] = []
    try:
        with httpx.stream("POST", f"{url}v1/chat/completions", json=body, timeout=60,
                          headers={"Authorization": "Bearer pw"}) as response:
            for line in response.iter_lines():
                if line.startswith("data: "):
                    events.append(line.removeprefix("data: "))
                    if _content(events[-1]):
                        runner.go.set()  # the first piece is here: let the model go on
    finally:
        runner.go.set()
    assert events[-1] == "[DONE]"
    pieces = [_content(event) for event in events[:-1]]
    assert len([p for p in pieces if p]) >= 2, "the reply came in pieces as it was made"
    assert "".join(pieces) == text


def _content(event: str) -> str:
    """The text of one streamed chunk (`data: {...}`); "" for [DONE] and chunks without text."""
    if event == "[DONE]":
        return ""
    choices = json.loads(event)["choices"]
    return (choices[0]["delta"].get("content") or "") if choices else ""


def test_api_and_ui_users_share_one_engine_and_batch(served):
    app, url = served
    sizes, stop = [], threading.Event()

    def watch():
        while not stop.wait(0.002):
            sizes.append(app.engine.state().batch_size)

    threading.Thread(target=watch, daemon=True).start()
    gradio = Client(url, auth=("ann", "pw"), verbose=False)
    job = gradio.submit(message={"text": "Describe it", "files": [handle_file(str(ASSETS / "scene.png"))]},
                        history=[], max_new_tokens=1024, temperature=0, top_p=1, api_name="/chat")
    assert wait_until(lambda: app.engine.state().batch_size == 1), "the page's request is generating"
    reply = client_for(url).chat.completions.create(model="tiny", messages=ask("And this?", "receipt.png"),
                                                     max_tokens=64, temperature=0)
    assert job.result(timeout=60) and reply.choices[0].message.content
    stop.set()
    gradio.close()
    assert max(sizes) == 2, "the API request and the page's request ran in one batch"


def test_bad_requests_get_clear_errors(served):
    _, url = served
    client = client_for(url)
    with pytest.raises(openai.BadRequestError, match="not an uploaded file"):
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": f"{url}gradio_api/file=/etc/passwd"}}]}])
    with pytest.raises(openai.BadRequestError, match="not an image"):
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(b"hi").decode()}}]}])
    with pytest.raises(openai.BadRequestError, match="last message"):
        client.chat.completions.create(model="tiny", messages=[{"role": "assistant", "content": "hi"}])
    assert httpx.get(f"{url}health", timeout=10).json() == {"status": "ok"}  # with --auth, only that


def test_busy_beyond_the_queue_size(tiny_settings, loaded_tiny):
    """--concurrency 1 and --queue-size 1 hold for the API too: one runs, one waits, one is told
    to come back later (503 with Retry-After), and the waiting one is answered in its turn."""
    app = build_app(replace(tiny_settings, cache_size=0, max_batch=1, concurrency=1, queue_size=1,
                            max_new_tokens=1024), loaded_tiny)
    _, url, _ = app.launch(server_port=None, quiet=True)
    try:
        running, _ = app.service.submit({"text": "a long story", "files": []}, [], SamplingParams(max_new_tokens=1024))
        waiting = threading.Thread(target=lambda: client_for(url, key="none").chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=4))
        waiting.start()
        assert wait_until(lambda: app.service.gate.waiting == 1)
        with pytest.raises(openai.InternalServerError, match="busy") as refused:
            client_for(url, key="none").chat.completions.create(
                model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=4)
        assert refused.value.response.status_code == 503 and refused.value.response.headers["retry-after"]
        running.cancel()
        waiting.join(60)
        assert wait_until(lambda: app.service.gate.inside == 0)
    finally:
        app.close()


def test_top_k_and_repetition_penalty_as_extra_body_fields(served, monkeypatch):
    """vLLM's extra fields reach the engine as the request's settings; a client that sends no
    settings gets the checkpoint's (the tiny model ships MiniCPM-V 4.6's generation config)."""
    app, url = served
    seen: list[SamplingParams] = []
    submit = app.engine.submit
    monkeypatch.setattr(app.engine, "submit", lambda conversation, params: seen.append(params) or
                        submit(conversation, params))
    client = client_for(url)
    client.chat.completions.create(model="tiny", messages=ask("What is this?", "chart.png"), max_tokens=4,
                                   temperature=0.5, extra_body={"top_k": 20, "repetition_penalty": 1.3})
    client.chat.completions.create(model="tiny", messages=ask("What is this?", "chart.png"),
                                   extra_body={"top_k": -1})
    client.chat.completions.create(model="tiny", messages=ask("What is this?", "chart.png"))
    assert seen[0] == SamplingParams(max_new_tokens=4, temperature=0.5, top_p=1.0, top_k=20, repetition_penalty=1.3)
    assert seen[1].top_k == 0, "-1 (vLLM's 'off') is off"
    assert seen[2] == app.service.defaults
    assert (seen[2].temperature, seen[2].top_p, seen[2].top_k, seen[2].repetition_penalty) == (0.7, 1.0, 0, 1.0)
    for bad in ({"top_k": "many"}, {"repetition_penalty": [2]}, {"repetition_penalty": "nan"}):
        with pytest.raises(openai.BadRequestError, match="must be a"):
            client.chat.completions.create(model="tiny", messages=ask("What is this?", "chart.png"), extra_body=bad)
    assert len(seen) == 3, "refused requests never reach the engine"
