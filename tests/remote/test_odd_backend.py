"""`--backend` against a backend that answers oddly or with hostile intent (a real HTTP server on
loopback, see odd_backend.py): the status checker survives every answer and /health stays
honest; no answer is read past a bound; no reply outlives its deadline or its token count."""

from __future__ import annotations

import httpx
import pytest

from conftest import ask, wait_until
from minicpmv_demo.config.settings import Settings
from minicpmv_demo.engine import FinishReason, ReplyError, SamplingParams
from minicpmv_demo.remote import BackendProbe, RemoteEngine
from minicpmv_demo.web.server import build_app
from odd_backend import GOOD_MODELS, OddBackend

MB = 2**20
ODD_MODEL_LISTS = [
    ((200, '{"data": ["g"]}'), "/v1/models lists a model without a usable id"),
    ((200, '{"data": [{"id": 5}]}'), "/v1/models lists a model without a usable id"),
    ((200, "[" * 30_000 + "]" * 30_000), "/v1/models answered JSON nested too deeply"),
    ((200, '{"data": {"id": "m"}}'), "/v1/models did not answer a model list"),
    ((200, "<html>not json</html>"), "/v1/models did not answer JSON"),
    ((200, '{"data": []}'), "the backend lists no model"),
    ((200, b"[" + b" " * (8 * MB) + b"]"), "/v1/models answered more than 64 KB"),
    ((500, b"x" * (8 * MB)), "/v1/models answered HTTP 500"),
]


@pytest.fixture
def odd():
    backend = OddBackend()
    yield backend
    backend.close()


@pytest.fixture
def remote(odd):
    """A backend client of the odd server, whose replies may take 2 s in all."""
    engine = RemoteEngine(BackendProbe(odd.url, interval_s=60), timeout_s=10, reply_seconds=2).start()
    yield engine
    engine.shutdown()


def test_the_checker_survives_any_model_list_and_says_what_was_wrong(odd):
    odd.models = ODD_MODEL_LISTS[0][0]
    probe = BackendProbe(odd.url, interval_s=0.05).start()  # the answer at start-up too
    try:
        for answer, reason in ODD_MODEL_LISTS:
            odd.models = answer
            assert wait_until(lambda: probe.status.error == reason, timeout=30), (reason, probe.status)
            assert not probe.status.reachable and probe._thread.is_alive()
        odd.models = (200, GOOD_MODELS)
        assert wait_until(lambda: probe.status.reachable, timeout=30), "the checker lives on"
        assert (probe.status.model, probe.status.kind, probe.status.error) == ("odd", "odd-server", None)
    finally:
        probe.stop()


def test_the_app_starts_and_health_tells_the_truth_whatever_the_backend_lists(odd):
    odd.models = (200, '{"data": ["g"]}')
    front = build_app(Settings(backend=odd.url, panel_interval=0.05, backend_timeout=10))
    _, url, _ = front.launch(server_port=None, quiet=True)
    try:
        health = httpx.get(f"{url}health", timeout=10)
        assert health.status_code == 503 and health.json()["status"] == "backend down"
        backend = health.json()["backend"]
        assert backend["error"] == "/v1/models lists a model without a usable id"
        assert "url" not in backend and odd.url not in health.text, "the address is left out unless asked"
        stream, _ = front.service.submit({"text": "hello", "files": []}, [], SamplingParams(max_new_tokens=4))
        with pytest.raises(ReplyError, match="not reachable"):
            stream.result(timeout=30)
        odd.models = (200, GOOD_MODELS)
        assert wait_until(lambda: httpx.get(f"{url}health", timeout=10).status_code == 200, timeout=30)
    finally:
        front.close()


def test_health_names_the_backend_url_only_when_asked(odd):
    front = build_app(Settings(backend=odd.url, show_backend_url=True))
    _, url, _ = front.launch(server_port=None, quiet=True)
    try:
        assert httpx.get(f"{url}health", timeout=10).json()["backend"]["url"] == odd.url
    finally:
        front.close()


def test_a_reply_without_end_stops_at_the_tokens_asked_for(odd, remote):
    odd.chat = "endless"
    stream = remote.submit(ask("Tell me everything."), SamplingParams(max_new_tokens=16))
    text = stream.result(timeout=60)
    assert stream.stats.finish_reason == FinishReason.LENGTH
    assert 0 < len(text.split()) <= 16 + 8, text
    assert wait_until(odd.closed_by_client.is_set, timeout=30), "the endless stream was closed"


def test_a_backend_that_only_keeps_the_connection_alive_is_cut_at_the_deadline(odd, remote):
    odd.chat = "keepalive"
    stream = remote.submit(ask("Hello?"), SamplingParams(max_new_tokens=16))
    with pytest.raises(ReplyError, match="took too long to answer \\(more than 2 s in all\\)"):
        stream.result(timeout=60)
    assert wait_until(odd.closed_by_client.is_set, timeout=30)


@pytest.mark.parametrize("behaviour, message", [
    ("huge error", "The model server failed \\(500\\)"),
    ("long line", "connection to the model server was lost"),
])
def test_a_huge_answer_is_read_only_up_to_a_bound(odd, remote, behaviour, message):
    """The server offers 256 MB; the client stops after a few KB. What the server managed to
    send before it noticed is what the sockets' buffers held, a few MB."""
    odd.chat = behaviour
    stream = remote.submit(ask("Hello?"), SamplingParams(max_new_tokens=16))
    with pytest.raises(ReplyError, match=message):
        stream.result(timeout=60)
    assert wait_until(odd.closed_by_client.is_set, timeout=30)
    assert odd.sent < 32 * MB, f"{odd.sent / MB:.0f} MB were read"
