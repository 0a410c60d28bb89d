"""The tiny MiniCPM-V 2.5 served by a real app (its checkpoint folder as --model), through gradio_client:
concurrent picture questions batched and answered as alone, the request's slice count, the
release's sampling defaults, videos refused."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
from gradio_client import Client, handle_file

from clips import make_clip
from conftest import launch_app, wait_until
from minicpmv2_support import GatedRunner, tiny_v25_dir, v25_cache  # noqa: F401 (fixtures)
from minicpmv_demo.config.settings import Settings
from minicpmv_demo.model import load_model

ASSETS = Path(__file__).resolve().parents[2] / "assets"


@pytest.fixture(scope="module")
def served(tiny_v25_dir):
    settings = Settings(model=str(tiny_v25_dir), max_batch=8, cache_size=0, stream_interval=0.01)
    loaded = load_model(settings)
    gated = GatedRunner(loaded.runner)
    gated.allow_all()
    app, url = launch_app(settings, replace(loaded, runner=gated))
    client = Client(url, verbose=False)
    yield app, client, gated
    client.close()
    app.close()


def chat(client: Client, text: str, *images: str, **options) -> str:
    return client.predict(message={"text": text, "files": [handle_file(str(ASSETS / i)) for i in images]},
                          history=[], max_new_tokens=24, temperature=0.0, top_p=1.0, api_name="/chat", **options)


def test_six_concurrent_picture_questions_batch_and_answer_as_alone(served):
    app, client, gated = served
    names = ["scene.png", "chart.png", "receipt.png", "diagram.png", "favicon.png", "chart.png"]
    questions = [(f"Question {i}: what is in the picture?", name) for i, name in enumerate(names)]
    alone = [chat(client, text, name) for text, name in questions]
    gated.hold()
    gated.largest_batch = 0
    jobs = [client.submit(message={"text": text, "files": [handle_file(str(ASSETS / name))]}, history=[],
                          max_new_tokens=24, temperature=0.0, top_p=1.0, api_name="/chat")
            for text, name in questions]
    # The first is held before its first decode step, the others wait in the engine's queue.
    assert wait_until(lambda: app.engine.active_rows + app.engine.scheduler.queue_depth == 6, timeout=60)
    gated.allow_all()
    assert [job.result(timeout=60) for job in jobs] == alone
    assert gated.largest_batch >= 2 and len(set(alone)) == 6


def test_the_requests_slice_count_and_the_releases_sampling_defaults(served):
    app, client, _ = served
    assert chat(client, "Describe the chart.", "chart.png", max_slice_nums=1) != chat(client, "Describe the chart.",
                                                                                       "chart.png")
    defaults = app.service.defaults
    assert (defaults.temperature, defaults.top_p, defaults.top_k, defaults.repetition_penalty) == (0.7, 0.8, 100, 1.05)


def test_a_video_is_refused_with_a_clear_message(served, tmp_path):
    _, client, _ = served
    clip = make_clip(tmp_path / "clip.mp4", seconds=1)
    with pytest.raises(Exception, match="clip.mp4: this model does not read videos; attach pictures instead."):
        client.predict(message={"text": "What happens?", "files": [handle_file(str(clip))]}, history=[],
                       max_new_tokens=8, temperature=0.0, top_p=1.0, api_name="/chat")
    assert chat(client, "Still there?", "scene.png")
