"""A real launched app answering through gradio_client: /chat, images, history, concurrency, queue."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image
from conftest import HeldRunner, launch_app, run_concurrently, wait_until
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError


ASSETS = Path(__file__).resolve().parents[2] / "assets"



@pytest.fixture(scope="module")
def served(tiny_settings, loaded_tiny):
    from dataclasses import replace

    held = replace(loaded_tiny, runner=HeldRunner(loaded_tiny.runner))
    app, url = launch_app(replace(tiny_settings, max_batch=8, cache_size=0, stream_interval=0.01), held)
    client = Client(url, verbose=False)
    yield app, client
    client.close()
    app.close()


def chat(client: Client, text: str, *images: str, history=None, max_new_tokens=16, temperature=0.0):
    return client.predict(message={"text": text, "files": [handle_file(str(ASSETS / i)) for i in images]},
                          history=history or [], max_new_tokens=max_new_tokens, temperature=temperature,
                          top_p=1.0, api_name="/chat")


def test_chat_answers_an_image_question_and_streams(served):
    """The model is held after its first token until that piece reached the client: the reply
    streams in pieces on a machine of any speed."""
    app, client = served
    app.engine.runner.go.clear()
    try:
        job = client.submit(message={"text": "What is in the image?",
                                     "files": [handle_file(str(ASSETS / "scene.png"))]},
                            history=[], max_new_tokens=40, temperature=0.0, top_p=1.0, api_name="/chat")
        assert wait_until(lambda: any(job.outputs()), timeout=60), "the first piece arrives on its own"
    finally:
        app.engine.runner.go.set()
    final = job.result(timeout=60)
    partials = job.outputs()
    assert len(final.split()) >= 10
    assert len(partials) >= 2, "the reply should arrive in several pieces"
    assert all(final.startswith(p) for p in partials)


def test_same_question_same_greedy_answer_and_images_matter(served):
    _, client = served
    first = chat(client, "Describe it.", "chart.png")
    assert chat(client, "Describe it.", "chart.png") == first
    assert chat(client, "Describe it.", "receipt.png") != first


def test_multi_turn_history_changes_the_answer(served):
    _, client = served
    first = chat(client, "What is this?", "scene.png")
    history = [{"role": "user", "content": "What is this?"}, {"role": "assistant", "content": first}]
    alone = chat(client, "And the colors?", "scene.png")
    followed = chat(client, "And the colors?", "scene.png", history=history)
    assert followed and alone and followed != alone
    assert chat(client, "And the colors?", "scene.png", history=history) == followed


def test_sixteen_concurrent_users_get_their_own_answers(served):
    _, client = served
    names = ["scene.png", "chart.png", "receipt.png", "diagram.png"]
    expected = {name: chat(client, f"What is in {name}?", name) for name in names}
    replies = run_concurrently(lambda i: chat(client, f"What is in {names[i % 4]}?", names[i % 4]), 16)
    assert replies == [expected[names[i % 4]] for i in range(16)]


def _bad_upload(kind: str, folder: Path) -> list[Path]:
    """Files a public demo gets, made here: each must be refused with a clear message."""
    if kind == "text-named-png":
        (folder / "notes.png").write_text("this is not a picture")
        return [folder / "notes.png"]
    if kind == "truncated":
        (folder / "cut.png").write_bytes((ASSETS / "receipt.png").read_bytes()[:900])
        return [folder / "cut.png"]
    if kind == "bomb":
        Image.new("1", (9000, 9000)).save(folder / "bomb.png", optimize=True)  # 81 MP in a few KB
        return [folder / "bomb.png"]
    return [ASSETS / "chart.png"] * 5  # too many images


@pytest.mark.parametrize("kind, message", [
    ("text-named-png", "not an image"), ("truncated", "damaged or truncated|not an image"),
    ("bomb", "too many to open"), ("too-many", "Too many images"),
])
def test_bad_upload_gets_a_clear_message_and_the_next_request_works(served, tmp_path, kind, message):
    _, client = served
    files = [handle_file(str(path)) for path in _bad_upload(kind, tmp_path)]
    with pytest.raises(Exception, match=message) as caught:
        client.predict(message={"text": "What?", "files": files}, history=[], max_new_tokens=8, temperature=0.0,
                       top_p=1.0, api_name="/chat")
    assert "Traceback" not in str(caught.value)
    assert chat(client, "Still there?", "scene.png")


def test_empty_message_is_refused_and_the_next_request_works(served):
    _, client = served
    with pytest.raises(Exception, match="type a question or attach an image"):
        chat(client, "   ")
    assert chat(client, "Still there?", "scene.png")


def test_queue_full_gives_busy_and_nothing_breaks(tiny_settings, loaded_tiny):
    from dataclasses import replace

    app, url = launch_app(replace(tiny_settings, max_batch=1, concurrency=1, queue_size=1, cache_size=0),
                      loaded_tiny)
    client = Client(url, verbose=False)
    try:
        jobs = [client.submit(message={"text": f"q{i}", "files": []}, history=[], max_new_tokens=300,
                              temperature=0.0, top_p=1.0, api_name="/chat") for i in range(6)]
        outcomes = []
        for job in jobs:
            try:
                outcomes.append(bool(job.result(timeout=120)))
            except Exception as exc:  # noqa: BLE001
                outcomes.append(type(exc).__name__)
        assert True in outcomes, outcomes
        assert any(o not in (True,) for o in outcomes), "a queue of 1 must turn some requests away"
        assert chat(client, "after the rush")  # still serving
    finally:
        client.close()
        app.close()


def test_chat_takes_the_prompt_and_sampling_settings_as_keywords(served):
    """/chat's keyword arguments follow vLLM's names; a bad choice is refused with its reason."""
    app, client = served
    reply = client.predict(message={"text": "Describe it.", "files": [handle_file(str(ASSETS / "chart.png"))]},
                           history=[], max_new_tokens=8, temperature=0.7, top_p=0.9, top_k=5,
                           repetition_penalty=1.3, enable_thinking=False, downsample_mode="4x",
                           max_slice_nums=4, max_num_frames=8, api_name="/chat")
    assert reply.strip()
    with pytest.raises(Exception, match="downsample_mode"):
        client.predict(message={"text": "hi", "files": []}, history=[], max_new_tokens=4, temperature=0, top_p=1,
                       downsample_mode="8x", api_name="/chat")
    with pytest.raises(Exception, match="thinking setting must be true or false"):
        client.predict(message={"text": "hi", "files": []}, history=[], max_new_tokens=4, temperature=0, top_p=1,
                       enable_thinking="maybe", api_name="/chat")
    assert chat(client, "Still fine?"), "the refusals left the server working"


def test_chat_needs_only_the_message(served):
    """/chat's docstring says every argument after `message` may be left out; gradio_client agrees."""
    _, client = served
    parameters = client.view_api(print_info=False, return_format="dict")["named_endpoints"]["/chat"]["parameters"]
    required = {p["parameter_name"] for p in parameters if not p["parameter_has_default"]}
    assert required <= {"message"}, required
    assert client.predict(message={"text": "Describe it.", "files": [handle_file(str(ASSETS / "chart.png"))]},
                          api_name="/chat")


def test_a_broken_gpu_takes_health_down_and_ends_the_process(tiny_settings, loaded_tiny):
    """A sticky device error: /health answers 503 (engine down) and the server asks for its exit,
    so that its supervisor or the Space restarts it."""
    import httpx

    from conftest import OutOfMemoryModel
    from minicpmv_demo.model.minicpmv4.runner import MiniCPMV4Runner

    class Broken(OutOfMemoryModel):
        def check(self, input_ids) -> None:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")

    runner = MiniCPMV4Runner(Broken(loaded_tiny.runner.model, max_rows=8), loaded_tiny.runner.processor)
    from dataclasses import replace

    app, url = launch_app(tiny_settings, replace(loaded_tiny, runner=runner))
    reasons: list[str] = []
    app.engine.on_fatal = reasons.append  # the real one ends this process (see the next test)
    try:
        client = Client(url, verbose=False)
        with pytest.raises(AppError, match="GPU failed"):
            client.predict(message={"text": "hello", "files": []}, history=[], max_new_tokens=8,
                           temperature=0.0, top_p=1.0, api_name="/chat")
        assert reasons and "illegal memory access" in reasons[0]
        assert wait_until(lambda: httpx.get(f"{url}health", timeout=10).status_code == 503)
        assert httpx.get(f"{url}health", timeout=10).json()["status"] == "engine down"
        client.close()
    finally:
        app.close()


def test_exit_for_restart_ends_the_process_with_its_status():
    import subprocess
    import sys

    from minicpmv_demo.web.server import RESTART_EXIT_CODE

    code = ("import time; from minicpmv_demo.web.server import exit_for_restart; "
            "exit_for_restart('test'); time.sleep(60)")
    done = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[2], timeout=120,
                          capture_output=True)
    assert done.returncode == RESTART_EXIT_CODE
