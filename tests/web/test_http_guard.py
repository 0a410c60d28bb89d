"""HTTP-level protection on a real launched app: body limits before reading, API login before the
body, throttled password guessing, and what /health and /openapi.json tell strangers.

The app runs in this process, so its memory is this process's RSS. Large bodies are generated
in 1 MB chunks (one buffer, sent again and again), so the test itself allocates almost nothing.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import httpx
import psutil
import pytest

from conftest import launch_app

ASSETS = Path(__file__).resolve().parents[2] / "assets"
MB = 1024 * 1024
CHUNK = b"a" * MB
KEY = {"Authorization": "Bearer pw"}



@pytest.fixture(scope="module")
def locked(tiny_settings, loaded_tiny):
    """An app with --auth. Its body limit is below the default so that what the app may buffer of
    a body before the limit (as much as the limit) stays far from the memory bound tested."""
    app, url = launch_app(replace(tiny_settings, auth="ann:pw", cache_size=0, max_body_mb=10), loaded_tiny)
    yield app, url
    app.close()


@pytest.fixture(scope="module")
def open_app(tiny_settings, loaded_tiny, tiny_dir):
    """An app without --auth, serving a model loaded from a local folder."""
    app, url = launch_app(replace(tiny_settings, cache_size=0), replace(loaded_tiny, model_id=tiny_dir))
    yield app, url
    app.close()


def client(address: str = "127.0.0.1", timeout: float = 60) -> httpx.Client:
    """A client whose connections come from `address`: the throttle counts per client address."""
    return httpx.Client(transport=httpx.HTTPTransport(local_address=address), timeout=timeout)


def megabytes(count: int):
    for _ in range(count):
        yield CHUNK


@contextmanager
def peak_rss_growth():
    """Yields a list that holds, afterwards, the most this process's RSS grew (MB) meanwhile."""
    process, peak, stop = psutil.Process(), [0], threading.Event()
    start = process.memory_info().rss

    def sample():
        while not stop.wait(0.005):
            peak[0] = max(peak[0], process.memory_info().rss - start)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    result = []
    try:
        yield result
    finally:
        stop.set()
        sampler.join()
        result.append(max(peak[0], process.memory_info().rss - start) / MB)


def chat_json(size_mb: int):
    """A valid chat request whose message is `size_mb` MB of text."""
    yield b'{"messages": [{"role": "user", "content": "'
    yield from megabytes(size_mb)
    yield b'"}]}'


def post_big(url: str, headers: dict, size_mb: int, declared: bool) -> httpx.Response:
    """POST a `size_mb` MB chat request, with a Content-Length header or chunked."""
    headers = {"Content-Type": "application/json", **headers}
    if declared:
        headers["Content-Length"] = str(sum(len(part) for part in chat_json(size_mb)))
    with client() as http:
        return http.post(url, content=chat_json(size_mb), headers=headers)


@pytest.mark.parametrize("declared", [True, False], ids=["content-length", "chunked"])
@pytest.mark.parametrize("key", [{}, KEY], ids=["no-key", "key"])
def test_huge_api_body_is_refused_before_it_is_read(locked, key, declared):
    _, url = locked
    with peak_rss_growth() as growth:
        response = post_big(f"{url}v1/chat/completions", key, 300, declared)
    assert growth[0] < 50, f"the server's memory grew {growth[0]:.0f} MB"
    assert response.status_code == (413 if key else 401), response.text
    assert "error" in response.json()


def test_body_limit_names_its_setting_and_smaller_bodies_pass(locked):
    app, url = locked
    response = post_big(f"{url}v1/chat/completions", KEY, int(app.settings.max_body_mb) + 1, declared=True)
    assert response.status_code == 413 and "--max-body-mb" in response.json()["error"]["message"]
    with client("127.0.0.5") as http:
        reply = http.post(f"{url}v1/chat/completions", headers=KEY, json={
            "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4})
    assert reply.status_code == 200 and reply.json()["choices"][0]["message"]["content"]


def multipart(files: int, size_mb: int, boundary: str = "guardtest"):
    """A multipart body of `files` files of zeros, generated as it is sent."""
    for index in range(files):
        yield (f"--{boundary}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"f{index}.png\"\r\n"
               "Content-Type: image/png\r\n\r\n").encode()
        yield from megabytes(size_mb)
        yield b"\r\n"
    yield f"--{boundary}--\r\n".encode()


@pytest.mark.parametrize("declared", [True, False], ids=["content-length", "chunked"])
def test_one_upload_request_carries_at_most_max_images_files(open_app, declared):
    app, url = open_app
    headers = {"Content-Type": "multipart/form-data; boundary=guardtest"}
    if declared:
        headers["Content-Length"] = str(sum(len(part) for part in multipart(5, 19)))
    with peak_rss_growth() as growth, client() as http:
        response = http.post(f"{url}gradio_api/upload", content=multipart(5, 19), headers=headers)
    assert growth[0] < 50, f"the server's memory grew {growth[0]:.0f} MB"
    assert response.status_code == 413, response.text
    assert f"{app.settings.max_images} files" in response.json()["error"]["message"]
    with client() as http, open(ASSETS / "chart.png", "rb") as image:
        response = http.post(f"{url}gradio_api/upload", files={"files": ("chart.png", image, "image/png")})
    assert response.status_code == 200 and response.json()[0].endswith("chart.png"), "a normal upload works"


def test_openapi_schema_needs_the_api_key(locked, open_app):
    _, url = locked
    with client() as http:
        assert http.get(f"{url}openapi.json").status_code == 401
        assert http.get(f"{url}openapi.json", headers=KEY).json()["openapi"]
        assert http.get(f"{url}openapi.json", auth=("ann", "pw")).status_code == 200
        assert http.get(f"{open_app[1]}openapi.json").status_code == 200


def test_password_guessing_is_slowed_per_client(locked):
    app, url = locked
    wrong, right = {"username": "ann", "password": "guess"}, {"username": "ann", "password": "pw"}
    with client("127.0.0.3") as guesser, client("127.0.0.2") as other:
        codes = [guesser.post(f"{url}login", data=wrong).status_code for _ in range(app.settings.login_failures)]
        assert codes == [400] * app.settings.login_failures
        blocked = guesser.post(f"{url}login", data=right)
        assert blocked.status_code == 429 and 0 < int(blocked.headers["Retry-After"]) <= 60
        assert guesser.get(f"{url}v1/models", headers=KEY).status_code == 429
        assert other.post(f"{url}login", data=right).status_code == 200
        assert other.get(f"{url}v1/models", headers=KEY).status_code == 200


def test_wrong_api_keys_count_as_failed_logins(locked):
    app, url = locked
    with client("127.0.0.4") as guesser:
        codes = [guesser.get(f"{url}v1/models", headers={"Authorization": f"Bearer {i}"}).status_code
                 for i in range(app.settings.login_failures)]
        assert codes == [401] * app.settings.login_failures
        blocked = guesser.post(f"{url}v1/chat/completions", headers=KEY, json={"messages": []})
        assert blocked.status_code == 429 and int(blocked.headers["Retry-After"]) > 0


def test_health_tells_strangers_only_the_status(locked, open_app):
    _, url = locked
    response = httpx.get(f"{url}health", timeout=10)
    assert response.status_code == 200 and response.json() == {"status": "ok"}
    app, open_url = open_app
    body = httpx.get(f"{open_url}health", timeout=10).json()
    name = Path(app.loaded.model_id).name
    assert body["status"] == "ok" and body["model"] == name
    assert app.loaded.model_id not in response.text + str(body)
    assert httpx.get(f"{open_url}v1/models", timeout=10).json()["data"][0]["id"] == name
