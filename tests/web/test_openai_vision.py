"""The OpenAI route's visual settings (`mm_processor_kwargs`) and videos (`video_url`), as vLLM
takes them, against a real server on the tiny model."""

from __future__ import annotations

import base64
from dataclasses import replace

import httpx
import pytest

from clips import make_clip
from conftest import ASSETS, launch_app
from minicpmv_demo.intake.message import _prepared_videos
from minicpmv_demo.intake.conversation import PromptOptions
from minicpmv_demo.intake.images import prepare_image
from minicpmv_demo.model.minicpmv4.runner import _visual_key


@pytest.fixture(scope="module")
def served(tiny_settings, loaded_tiny):
    app, url = launch_app(replace(tiny_settings, cache_size=0, max_video_seconds=2.5, max_video_frames=3),
                          loaded_tiny)
    yield app, url
    app.close()


def data_url(path, mime: str) -> str:
    return f"data:{mime};base64," + base64.b64encode(path.read_bytes()).decode()


def post(url: str, parts: list[dict], **extra) -> httpx.Response:
    body = {"model": "tiny", "max_tokens": 8, "temperature": 0,
            "messages": [{"role": "user", "content": [{"type": "text", "text": "What is it?"}, *parts]}], **extra}
    return httpx.post(f"{url}v1/chat/completions", json=body, timeout=60)


def picture_part(name: str = "chart.png") -> dict:
    return {"type": "image_url", "image_url": {"url": data_url(ASSETS / name, "image/png")}}


def video_part(path, mime: str = "video/mp4") -> dict:
    return {"type": "video_url", "video_url": {"url": data_url(path, mime)}}


def test_mm_processor_kwargs_reach_the_vision_tower(served):
    app, url = served
    reply = post(url, [picture_part()], mm_processor_kwargs={"downsample_mode": "4x", "max_slice_nums": 2},
                 chat_template_kwargs={"enable_thinking": True})  # both fields read, neither lost
    assert reply.json()["choices"][0]["message"].get("reasoning_content")
    assert reply.status_code == 200 and reply.json()["choices"][0]["message"]["content"]
    digest = prepare_image(ASSETS / "chart.png").digest
    key = _visual_key("image", PromptOptions(downsample_mode="4x", max_slice_nums=2), [digest])
    assert app.engine.runner._vision_cache.get(key) is not None
    assert post(url, [picture_part()], mm_processor_kwargs=None).status_code == 200


def test_a_video_url_is_answered_with_the_frames_asked_for(served, tmp_path):
    app, url = served
    clip = make_clip(tmp_path / "clip.webm", seconds=2)
    reply = post(url, [video_part(clip, "video/webm"), picture_part("scene.png")],
                 mm_processor_kwargs={"max_num_frames": 1})
    assert reply.status_code == 200 and reply.json()["choices"][0]["message"]["content"]
    frames = [len(video.frames) for video, _ in _prepared_videos._entries.values()]
    assert 1 in frames
    # Above the server's --max-video-frames (3): clamped, and a 2 s clip gives 2 frames anyway.
    assert post(url, [video_part(clip, "video/webm")], mm_processor_kwargs={"max_num_frames": 99}).status_code == 200


@pytest.mark.parametrize("extra, message", [
    ({"mm_processor_kwargs": {"downsample_mode": "8x"}}, "must be one of 16x, 4x, not '8x'"),
    ({"mm_processor_kwargs": {"max_slice_nums": "many"}}, "max_slice_nums must be a whole number, not 'many'"),
    ({"mm_processor_kwargs": {"max_num_frames": 2.5}}, "max_num_frames must be a whole number"),
    ({"mm_processor_kwargs": {"max_slice_nums": True}}, "max_slice_nums must be a whole number"),
    ({"mm_processor_kwargs": {"fps": 2}}, "Unsupported mm_processor_kwargs: fps"),
    ({"mm_processor_kwargs": [1]}, "'mm_processor_kwargs' must be an object"),
])
def test_bad_mm_processor_kwargs_get_400_with_a_message(served, extra, message):
    _, url = served
    reply = post(url, [picture_part()], **extra)
    assert reply.status_code == 400 and message in reply.json()["error"]["message"]


def test_bad_videos_get_400_with_a_message(served, tmp_path):
    _, url = served
    clip = make_clip(tmp_path / "clip.mp4", seconds=2)
    long_clip = make_clip(tmp_path / "long.mp4", seconds=3)
    (tmp_path / "noise.mp4").write_bytes(bytes(range(256)) * 8)
    cases = [
        (video_part(clip, "image/png"), "Videos must be video/mp4, video/webm, video/quicktime data URLs"),
        ({"type": "video_url", "video_url": {"url": "data:video/mp4;base64,%%%"}}, "not valid base64"),
        ({"type": "video_url", "video_url": "clip.mp4"}, 'A video_url part must look like {"video_url"'),
        (video_part(tmp_path / "noise.mp4"), "is not an MP4, WebM or MOV video."),
        (video_part(long_clip), "is 3 s long; the limit is 2.5 s."),
        ({"type": "video_url", "video_url": {"url": "http://example.com/clip.mp4"}},
         "video_url must be a data: URL or the URL of a file uploaded to this server"),
    ]
    for part, message in cases:
        reply = post(url, [part])
        assert reply.status_code == 400 and message in reply.json()["error"]["message"], reply.text
