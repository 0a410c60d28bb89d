"""`--backend URL`: this app in front of an OpenAI-compatible server, here a second instance of
itself serving the tiny model on loopback (vLLM itself needs a GPU)."""

from __future__ import annotations

import base64
import logging
import socket
from dataclasses import replace
from pathlib import Path

import httpx
import openai
import pytest
from gradio_client import Client, handle_file

from clips import make_clip
from conftest import HeldRunner, wait_until
from minicpmv_demo.engine import ReplyError, SamplingParams
from minicpmv_demo.remote import BackendProbe, RemoteEngine
from minicpmv_demo.remote.probe import prometheus_values
from minicpmv_demo.web.server import build_app
from minicpmv_demo.config.settings import Settings

ASSETS = Path(__file__).resolve().parents[2] / "assets"
GREEDY = {"max_new_tokens": 24, "temperature": 0.0, "top_p": 1.0}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_backend(tiny_settings, loaded_tiny, port: int):
    """A second instance of this app serving the tiny model; its runner can be held (HeldRunner)."""
    held = replace(loaded_tiny, runner=HeldRunner(loaded_tiny.runner))
    app = build_app(replace(tiny_settings, cache_size=0, max_new_tokens=2048), held)
    app.launch(server_port=port, quiet=True)
    return app


def start_front(backend_url: str):
    app = build_app(Settings(backend=backend_url, panel_interval=0.2, backend_timeout=10, max_new_tokens=2048))
    _, url, _ = app.launch(server_port=None, quiet=True)
    return app, url


@pytest.fixture(scope="module")
def pair(tiny_settings, loaded_tiny):
    port = free_port()
    backend = start_backend(tiny_settings, loaded_tiny, port)
    front, front_url = start_front(f"http://127.0.0.1:{port}/v1")
    yield {"backend": backend, "port": port, "front": front, "front_url": front_url}
    front.close()
    backend.close()


def backend_health(port: int) -> dict:
    return httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).json()


def direct(port: int, text: str, image: str, **extra) -> str:
    """The backend's own greedy answer, asked without the front end."""
    return _direct(port, text, image, **extra).content


def direct_reasoning(port: int, text: str, image: str, **extra) -> str | None:
    return _direct(port, text, image, **extra).model_extra.get("reasoning_content")


def _direct(port: int, text: str, image: str, **extra):
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0)
    image_url = "data:image/png;base64," + base64.b64encode((ASSETS / image).read_bytes()).decode()
    reply = client.chat.completions.create(
        model="tiny", max_tokens=GREEDY["max_new_tokens"], temperature=0, extra_body=extra or None,
        messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": image_url}},
                                                {"type": "text", "text": text}]}])
    return reply.choices[0].message


def test_the_page_chat_and_openai_route_answer_through_the_backend(pair):
    front_url, port = pair["front_url"], pair["port"]
    held = pair["backend"].engine.runner  # the backend's model waits after its first token...
    page = Client(front_url, verbose=False)
    held.go.clear()
    try:
        job = page.submit(message={"text": "What is in it?", "files": [handle_file(str(ASSETS / "scene.png"))]},
                          history=[], api_name="/chat", **GREEDY)
        assert wait_until(lambda: any(job.outputs()), timeout=60), "...until that piece reached the page"
    finally:
        held.go.set()
    answer = job.result(timeout=60)
    assert len(job.outputs()) >= 2, "the reply should stream in pieces"
    # The backend, asked directly with the same picture, gives the same greedy answer: it answered.
    assert answer == direct(port, "What is in it?", "scene.png")

    client = openai.OpenAI(base_url=f"{front_url}v1", api_key="none", max_retries=0)
    held.go.clear()
    pieces = []
    try:
        for chunk in client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Say something"}],
                                                    max_tokens=12, temperature=0, stream=True):
            pieces.append(chunk.choices[0].delta.content or "" if chunk.choices else "")
            if pieces[-1]:
                held.go.set()
    finally:
        held.go.set()
    assert len([p for p in pieces if p]) >= 2 and "".join(pieces).strip()


def test_thinking_reaches_the_backend_and_its_reasoning_comes_back_apart(pair):
    front_url, port = pair["front_url"], pair["port"]
    asked = {"chat_template_kwargs": {"enable_thinking": True}}
    expected = direct(port, "Think first.", "chart.png", **asked)
    client = openai.OpenAI(base_url=f"{front_url}v1", api_key="none", max_retries=0)
    image_url = "data:image/png;base64," + base64.b64encode((ASSETS / "chart.png").read_bytes()).decode()
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": image_url}},
                                             {"type": "text", "text": "Think first."}]}]
    through = client.chat.completions.create(model="tiny", messages=messages, max_tokens=GREEDY["max_new_tokens"],
                                             temperature=0, extra_body=asked)
    message = through.choices[0].message
    backend_reasoning = direct_reasoning(port, "Think first.", "chart.png", **asked)
    assert message.model_extra["reasoning_content"] == backend_reasoning and backend_reasoning
    assert (message.content or "") == expected
    assert through.usage.prompt_tokens > 0
    plain = client.chat.completions.create(model="tiny", messages=messages, max_tokens=GREEDY["max_new_tokens"],
                                           temperature=0, extra_body={"chat_template_kwargs": {"enable_thinking": False}})
    assert plain.choices[0].message.model_extra.get("reasoning_content") is None


def test_visual_detail_reaches_the_backend(pair):
    """The front's 4x request gets the backend's 4x answer, which is not its 16x answer."""
    asked = {"mm_processor_kwargs": {"downsample_mode": "4x", "max_slice_nums": 4}}
    fine = _direct(int(pair["front_url"].rstrip("/").rsplit(":", 1)[1]), "Read it.", "receipt.png", **asked).content
    assert fine == direct(pair["port"], "Read it.", "receipt.png", **asked)
    assert fine != direct(pair["port"], "Read it.", "receipt.png")


def test_a_video_question_answers_through_the_backend_with_its_frames(pair, tmp_path):
    clip = make_clip(tmp_path / "clip.mp4", seconds=4)
    client = openai.OpenAI(base_url=f"{pair['front_url']}v1", api_key="none", max_retries=0)
    video_url = "data:video/mp4;base64," + base64.b64encode(clip.read_bytes()).decode()

    def ask(frames: int):
        return client.chat.completions.create(
            model="tiny", max_tokens=8, temperature=0, extra_body={"mm_processor_kwargs": {"max_num_frames": frames}},
            messages=[{"role": "user", "content": [{"type": "video_url", "video_url": {"url": video_url}},
                                                    {"type": "text", "text": "What happens?"}]}])

    two, four = ask(2), ask(4)
    assert two.choices[0].message.content and four.choices[0].message.content
    # The backend read the frames the front sent: twice the frames, more prompt tokens.
    assert four.usage.prompt_tokens > two.usage.prompt_tokens > 0


def test_the_memory_line_and_panel_read_the_backend(pair):
    front = pair["front"]
    snapshot = front.service.memory_snapshot()
    assert snapshot["backend"]["kind"] == "minicpmv-demo" and snapshot["backend"]["reachable"]
    assert front.service.gpu.read().note == "backend runs on CPU"
    health = httpx.get(f"{pair['front_url']}health", timeout=5).json()
    assert health["status"] == "ok" and health["backend"]["model"] == "tiny"


def test_stop_frees_the_backends_row(pair):
    front, port = pair["front"], pair["port"]
    stream, _ = front.service.submit({"text": "a long story", "files": []}, [], SamplingParams(max_new_tokens=2000))
    assert wait_until(lambda: backend_health(port)["batch_size"] == 1, timeout=20)
    assert wait_until(lambda: len(stream.text) > 0, timeout=20)
    stream.cancel()
    assert wait_until(lambda: backend_health(port)["batch_size"] == 0, timeout=10), "the backend still decodes it"
    assert wait_until(lambda: stream.done, timeout=5)


def test_the_installed_openai_builds_the_backend_client():
    """The client the backend engine streams with is built by the openai release installed here
    (openai 3.x refused the httpx.Timeout that 2.x took: every --backend start failed)."""
    engine = RemoteEngine(BackendProbe(f"http://127.0.0.1:{free_port()}/v1"), timeout_s=7.5).start()
    try:
        assert isinstance(engine._client, openai.AsyncOpenAI) and engine._client.timeout == 7.5
    finally:
        engine.shutdown()


def test_a_client_that_cannot_be_built_is_one_line_at_start(monkeypatch, capsys):
    """If the installed openai cannot build its client (a broken or drifted install), --backend
    stops with one line saying what to do: no traceback, no half-built client's noise."""
    import app

    def refuse(*args, **kwargs):
        raise TypeError("Invalid timeout: expected a number")

    monkeypatch.setattr(openai, "AsyncOpenAI", refuse)
    assert app.main(["--backend", f"http://127.0.0.1:{free_port()}/v1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "Traceback" not in err
    assert "cannot build its client" in err and "requirements.txt" in err and openai.__version__ in err


def test_the_probe_logs_changes_not_every_poll(pair, caplog):
    """With --backend the probe asks every 2 s: the log says when the backend comes or goes,
    not one HTTP line per poll."""
    import app

    app.configure_logging()
    with caplog.at_level(logging.INFO):
        for url in (f"http://127.0.0.1:{pair['port']}/v1", f"http://127.0.0.1:{free_port()}/v1"):
            probe = BackendProbe(url, interval_s=60)
            for _ in range(3):
                probe.poll()
            probe.stop()
    lines = [record.getMessage() for record in caplog.records]
    assert len(lines) == 2 and "is up" in lines[0] and "unreachable" in lines[1], lines


def test_a_backend_down_at_start_is_said_and_contained():
    front, url = start_front(f"http://127.0.0.1:{free_port()}/v1")
    try:
        health = httpx.get(f"{url}health", timeout=5)
        assert health.status_code == 503 and health.json()["status"] == "backend down"
        stream, _ = front.service.submit({"text": "hello", "files": []}, [], SamplingParams(max_new_tokens=8))
        with pytest.raises(ReplyError, match="not reachable"):
            stream.result(timeout=20)
        assert "backend unreachable" in front.service.gpu.read().note
    finally:
        front.close()


def test_a_backend_killed_mid_stream_gives_a_message_and_the_front_recovers(tiny_settings, loaded_tiny):
    port = free_port()
    backend = start_backend(tiny_settings, loaded_tiny, port)
    front, url = start_front(f"http://127.0.0.1:{port}/v1")
    try:
        stream, _ = front.service.submit({"text": "a long story", "files": []}, [],
                                         SamplingParams(max_new_tokens=2000))
        assert wait_until(lambda: len(stream.text) > 0, timeout=20)
        backend.close()
        with pytest.raises(ReplyError, match="model server"):
            stream.result(timeout=30)
        assert wait_until(lambda: httpx.get(f"{url}health", timeout=5).status_code == 503, timeout=10)
        backend = start_backend(tiny_settings, loaded_tiny, port)
        assert wait_until(lambda: httpx.get(f"{url}health", timeout=5).status_code == 200, timeout=15)
        again, _ = front.service.submit({"text": "hello again", "files": []}, [], SamplingParams(max_new_tokens=8))
        assert again.result(timeout=30).strip()
    finally:
        front.close()
        backend.close()


def test_a_busy_backend_reads_busy(tiny_settings, loaded_tiny):
    """The backend's 503 (its queue is full) is "busy, try again" on the front, not a failure."""
    port = free_port()
    backend = build_app(replace(tiny_settings, cache_size=0, max_new_tokens=2048, concurrency=1, queue_size=1),
                        loaded_tiny)
    backend.launch(server_port=port, quiet=True)
    front, _ = start_front(f"http://127.0.0.1:{port}/v1")
    try:
        long = [front.service.submit({"text": f"story {i}", "files": []}, [], SamplingParams(max_new_tokens=2000))[0]
                for i in range(2)]
        assert wait_until(lambda: backend.service.gate.inside == 1 and backend.service.gate.waiting == 1, timeout=20)
        third, _ = front.service.submit({"text": "hello", "files": []}, [], SamplingParams(max_new_tokens=8))
        with pytest.raises(ReplyError, match="busy"):
            third.result(timeout=20)
        for stream in long:
            stream.cancel()
    finally:
        front.close()
        backend.close()


def test_vllm_metrics_are_read_from_the_prometheus_text():
    text = ("# HELP vllm:kv_cache_usage_perc KV-cache usage.\n"
            'vllm:kv_cache_usage_perc{engine="0",model_name="m"} 0.25\n'
            'vllm:num_requests_running{engine="0",model_name="m"} 3.0\n'
            'vllm:num_requests_waiting{engine="0",model_name="m"} 1.0\n'
            'vllm:num_requests_running{engine="1",model_name="m"} 2.0\n')
    values = prometheus_values(text)
    assert values["vllm:kv_cache_usage_perc"] == 0.25 and values["vllm:num_requests_running"] == 5.0
    assert values["vllm:num_requests_waiting"] == 1.0


def test_a_request_the_backend_refuses_is_a_400_at_the_front(tiny_settings, loaded_tiny):
    """The backend's 400 (a prompt longer than its context) stays a 400 through the front's API:
    a 500 would be retried unchanged by the openai SDK."""
    port = free_port()
    backend = build_app(replace(tiny_settings, cache_size=0, max_model_len=256), loaded_tiny)
    backend.launch(server_port=port, quiet=True)
    front, url = start_front(f"http://127.0.0.1:{port}/v1")
    try:
        client = openai.OpenAI(base_url=f"{url}v1", api_key="none", max_retries=0)
        with pytest.raises(openai.BadRequestError, match="refused this request: This message is too long"):
            client.chat.completions.create(model="tiny", max_tokens=8,
                                           messages=[{"role": "user", "content": "the sea and the sky " * 200}])
    finally:
        front.close()
        backend.close()
