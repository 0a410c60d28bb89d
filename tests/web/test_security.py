"""Who can reach the model and what they can reach: auth, queue-only routes, server files, limits."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import httpx
import pytest
from gradio_client import Client, handle_file

from conftest import launch_app
from minicpmv_demo.web.server import share_warning
from minicpmv_demo.config.settings import Settings

ASSETS = Path(__file__).resolve().parents[2] / "assets"



@pytest.fixture(scope="module")
def open_app(tiny_settings, loaded_tiny):
    app, url = launch_app(replace(tiny_settings, max_new_tokens=40, cache_size=0), loaded_tiny)
    yield app, url
    app.close()


def call_raw(url: str, data: list) -> str:
    """POST to Gradio's REST route for /chat and read the event stream back, as curl would.

    REST callers send every input: the settings after top-p (top-k ... max frames) as null."""
    data = data + [None] * (11 - len(data))
    event = httpx.post(f"{url}gradio_api/call/chat", json={"data": data}, timeout=30).json()["event_id"]
    return httpx.get(f"{url}gradio_api/call/chat/{event}", timeout=60).text


def test_message_files_must_be_uploads(open_app):
    _, url = open_app
    for path in ("/etc/passwd", str(ASSETS / ".." / ".." / ".." / "etc" / "passwd")):
        stream = call_raw(url, [{"text": "read it", "files": [{"path": path, "meta": {"_type": "gradio.FileData"}}]},
                                [], 8, 0, 1])
        assert "event: error" in stream and "root:" not in stream
        assert "not uploaded by a user" in stream, "the refusal says why, not a bare 'Error'"


def test_settings_gradio_cannot_read_get_a_message(open_app):
    _, url = open_app
    stream = call_raw(url, [{"text": "hi", "files": []}, [], "abc", 0, 1])
    assert "event: error" in stream and "max new tokens setting must be a number" in stream


def test_history_files_must_be_uploads(open_app):
    _, url = open_app
    client = Client(url, verbose=False)
    try:
        for path in ("/etc/passwd", "../../etc/hostname"):
            with pytest.raises(Exception, match="not an uploaded file"):
                client.predict(message={"text": "and this?", "files": []},
                               history=[{"role": "user", "content": [{"path": path}]}],
                               max_new_tokens=8, temperature=0, top_p=1, api_name="/chat")
        assert client.predict(message={"text": "still fine?", "files": [handle_file(str(ASSETS / "chart.png"))]},
                              history=[], max_new_tokens=8, temperature=0, top_p=1, api_name="/chat")
    finally:
        client.close()


def test_absurd_settings_are_clamped(open_app, loaded_tiny):
    _, url = open_app
    client = Client(url, verbose=False)
    try:
        reply = client.predict(message={"text": "go on", "files": []}, history=[], max_new_tokens=10**9,
                               temperature=-5, top_p=42, api_name="/chat")
    finally:
        client.close()
    tokens = len(loaded_tiny.runner.tokenizer(reply, add_special_tokens=False)["input_ids"])
    assert 0 < tokens <= 40, "the server's --max-new-tokens caps every request"


def test_health_is_plain_http(open_app):
    _, url = open_app
    body = httpx.get(f"{url}health", timeout=10).json()
    assert body["status"] == "ok" and body["engine_alive"] and body["model"] == "tiny"


def test_auth_protects_ui_and_api_but_not_health(tiny_settings, loaded_tiny):
    app, url = launch_app(replace(tiny_settings, auth="alice:s3cret"), loaded_tiny)
    try:
        assert httpx.get(f"{url}config", timeout=10).status_code == 401
        assert httpx.post(f"{url}gradio_api/call/chat", json={"data": [{"text": "hi", "files": []}, [], 4, 0, 1]},
                          timeout=10).status_code == 401
        with pytest.raises(ValueError, match="credentials were not provided"):
            Client(url, verbose=False)
        with pytest.raises(ValueError, match="Could not login"):
            Client(url, auth=("alice", "wrong"), verbose=False)
        client = Client(url, auth=("alice", "s3cret"), verbose=False)
        assert client.predict(message={"text": "hello", "files": []}, history=[], max_new_tokens=4, temperature=0,
                              top_p=1, api_name="/chat")
        client.close()
        assert httpx.get(f"{url}health", timeout=10).status_code == 200
    finally:
        app.close()


def test_share_without_auth_warns():
    assert "public" in share_warning(Settings(share=True))
    assert share_warning(Settings(share=True, auth="a:b")) is None
    assert share_warning(Settings()) is None


def test_no_route_reaches_the_model_outside_the_queue(open_app):
    """api_open=False: the old direct REST route is closed; only queued routes answer."""
    _, url = open_app
    direct = httpx.post(f"{url}gradio_api/api/chat", json={"data": [{"text": "hi", "files": []}, [], 4, 0, 1]},
                        timeout=10)
    assert direct.status_code >= 400


def test_x_forwarded_for_names_the_client_only_behind_a_trusted_proxy(tiny_settings, loaded_tiny):
    """Without --trusted-proxy a client on this machine cannot pose as many addresses to escape
    the login throttle; behind the proxy it names, the header names each client."""
    outcomes = {}
    for proxy in ("", "127.0.0.1"):
        app, url = launch_app(replace(tiny_settings, auth="ann:pw", login_failures=3, trusted_proxy=proxy),
                              loaded_tiny)
        try:
            outcomes[proxy] = [httpx.get(f"{url}v1/models", timeout=10, headers={
                "authorization": "Bearer wrong", "x-forwarded-for": f"10.0.0.{i}"}).status_code for i in range(6)]
        finally:
            app.close()
    assert outcomes[""] == [401] * 3 + [429] * 3, "one address, whatever the header says"
    assert outcomes["127.0.0.1"] == [401] * 6, "six clients behind the proxy, one failure each"


def test_trusted_proxy_must_be_addresses():
    from minicpmv_demo.config.settings import parse_settings

    assert parse_settings(["--trusted-proxy", "10.0.0.2, 10.1.0.0/16,::1"], environ={}).trusted_proxies == (
        "10.0.0.2", "10.1.0.0/16", "::1")
    with pytest.raises(SystemExit):
        parse_settings(["--trusted-proxy", "proxy.local"], environ={})
