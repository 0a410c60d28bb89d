"""Video questions: clips the tests write with PyAV are checked, sampled, read through the
MiniCPM-V 4.6 processor's video path, and answered by the engine beside picture questions."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from clips import frame_second, make_clip
from conftest import asset_image
from minicpmv_demo.intake.message import InputError, InputRules, build_conversation
from minicpmv_demo.web.chat_service import ChatService, upload_root
from minicpmv_demo.intake.conversation import Conversation, PromptOptions, Turn
from minicpmv_demo.engine import SamplingParams
from minicpmv_demo.system.gpu import GpuMemory
from minicpmv_demo.intake.images import ImageLimits
from minicpmv_demo.model.minicpmv4.runner import MiniCPMV4Runner
from minicpmv_demo.intake.videos import FRAME_SIDE, VideoLimits, prepare_video, sample_times

GREEDY = SamplingParams(max_new_tokens=8, temperature=0.0)


def refusal(path, limits: VideoLimits = VideoLimits(), frames: int = 8) -> str:
    with pytest.raises(ValueError) as caught:
        prepare_video(path, limits, frames)
    return str(caught.value)


# --- decoding and sampling -------------------------------------------------------------------
@pytest.mark.parametrize("suffix", [".mp4", ".webm", ".mov"])
def test_short_clips_give_one_frame_a_second_in_each_container(tmp_path, suffix):
    video = prepare_video(make_clip(tmp_path / f"clip{suffix}", seconds=3), VideoLimits(), frames=32)
    assert [frame_second(frame) for frame in video.frames] == [0, 1, 2]
    assert video.seconds == pytest.approx(3, abs=0.15) and video.notices == ()
    assert all(frame.mode == "RGB" and frame.size == (96, 64) for frame in video.frames)


def test_long_clips_give_evenly_spaced_frames_up_to_the_count(tmp_path):
    clip = make_clip(tmp_path / "long.mp4", seconds=40, fps=5)
    assert [frame_second(f) for f in prepare_video(clip, VideoLimits(), frames=4).frames] == [5, 15, 25, 35]
    # 20 s between the wanted frames: reached by seeking, same frames as decoding through.
    assert [frame_second(f) for f in prepare_video(clip, VideoLimits(), frames=2).frames] == [10, 30]
    assert sample_times(40, 2) == [10, 30] and sample_times(0.4, 8) == [0.2]


def test_portrait_phone_video_is_turned_upright(tmp_path):
    clip = make_clip(tmp_path / "phone.mov", seconds=1, rotation=-90)  # shown turned a quarter clockwise
    (frame,) = prepare_video(clip, VideoLimits(), frames=4).frames
    pixels = np.asarray(frame)
    assert frame.size == (64, 96)
    assert pixels[:40, :, 1].mean() > 150 and pixels[56:, :, 1].mean() < 50  # the green left half is on top


def test_large_frames_are_kept_small_and_same_frames_share_a_digest(tmp_path):
    big = prepare_video(make_clip(tmp_path / "big.mp4", seconds=1, size=(1280, 720)), VideoLimits(), frames=4)
    assert [frame.size for frame in big.frames] == [(FRAME_SIDE, 360)]
    first = prepare_video(make_clip(tmp_path / "a.mp4"), VideoLimits(), frames=4)
    copy = (tmp_path / "copy.mp4")
    copy.write_bytes((tmp_path / "a.mp4").read_bytes())
    assert prepare_video(copy, VideoLimits(), frames=4).digest == first.digest
    assert prepare_video(copy, VideoLimits(), frames=1).digest != first.digest


def test_limits_and_broken_files_are_refused_with_clear_messages(tmp_path):
    clip = make_clip(tmp_path / "clip.mp4", seconds=2)
    assert refusal(clip, VideoLimits(max_file_bytes=1000)).startswith("clip.mp4 is 0.0")
    assert "the limit for videos is 0.000954 MB" in refusal(clip, VideoLimits(max_file_bytes=1000))
    assert refusal(clip, VideoLimits(max_seconds=1.5)) == "clip.mp4 is 2 s long; the limit is 1.5 s."
    assert refusal(make_clip(tmp_path / "film.mov", seconds=4), VideoLimits(max_seconds=3)) == \
        "film.mov is 4 s long; the limit is 3 s."
    assert refusal(clip, VideoLimits(max_frame_pixels=5000)) == (
        "clip.mp4 has frames of 96x64 pixels, too many to decode (the limit is 0.005 megapixels).")
    damaged = "is damaged or not a video this demo can read (use MP4, WebM or MOV)."
    (tmp_path / "noise.mp4").write_bytes(bytes(range(256)) * 40)
    assert refusal(tmp_path / "noise.mp4") == "noise.mp4 is not an MP4, WebM or MOV video."
    (tmp_path / "boxes.mp4").write_bytes(b"\0\0\0\x18ftypisom" + bytes(range(256)) * 40)
    assert refusal(tmp_path / "boxes.mp4") == f"boxes.mp4 {damaged}"
    (tmp_path / "half.mp4").write_bytes(clip.read_bytes()[: clip.stat().st_size // 2])
    assert refusal(tmp_path / "half.mp4") == f"half.mp4 {damaged}"
    Image.new("RGB", (32, 32)).save(tmp_path / "picture.png")
    (tmp_path / "picture.webm").write_bytes((tmp_path / "picture.png").read_bytes())
    assert refusal(tmp_path / "picture.webm") == "picture.webm is not an MP4, WebM or MOV video."
    (tmp_path / "empty.mov").write_bytes(b"")
    assert refusal(tmp_path / "empty.mov") == "empty.mov is empty (0 bytes)."


# --- the chat input -------------------------------------------------------------------------------
def rules_for(tmp_path, **changes) -> InputRules:
    rules = InputRules(image_limits=ImageLimits(), max_images=3, allowed_roots=(str(tmp_path),),
                       video_limits=VideoLimits(), max_videos=1, video_frames=2)
    return replace(rules, **changes)


def test_chat_input_reads_uploaded_videos_with_the_requests_frame_count(tmp_path):
    clip = str(make_clip(tmp_path / "clip.mp4", seconds=5))
    rules = rules_for(tmp_path)
    conversation, _ = build_conversation({"text": "what happens?", "files": [clip]}, [], system_prompt="",
                                         rules=rules)
    assert [len(v.frames) for v in conversation.videos()] == [2]  # the server's default
    options = PromptOptions(max_num_frames=5)
    history = [{"role": "user", "content": {"path": clip}}, {"role": "assistant", "content": "a clip"}]
    conversation, _ = build_conversation({"text": "and then?", "files": [clip]}, history, system_prompt="",
                                         rules=rules, options=options)
    assert [len(v.frames) for v in conversation.videos()] == [5, 5] and conversation.options == options
    assert conversation.turns[0].videos and not conversation.turns[0].images


def test_chat_input_counts_videos_in_the_limits(tmp_path):
    clips = [str(make_clip(tmp_path / f"c{i}.webm", seconds=1)) for i in range(2)]
    pictures = []
    for i in range(3):
        Image.new("RGB", (32, 32), (i * 40, 0, 0)).save(tmp_path / f"p{i}.png")
        pictures.append(str(tmp_path / f"p{i}.png"))

    def refused(files, **changes) -> str:
        with pytest.raises(InputError) as caught:
            build_conversation({"text": "?", "files": files}, [], system_prompt="",
                               rules=rules_for(tmp_path, **changes))
        return str(caught.value)

    assert refused([*pictures, clips[0]]) == "Too many images and videos in one message: 4 (the limit is 3)."
    assert refused(clips) == "Too many videos in one message: 2 (the limit is 1)."
    assert refused(clips[:1], video_limits=None) == \
        "c0.webm: this model does not read videos; attach pictures instead."
    assert refused(clips[:1], allowed_roots=("/nonexistent",)) == \
        "c0.webm is not an uploaded file; upload it instead."
    assert refused(clips[:1], video_limits=VideoLimits(max_seconds=0.5)) == "c0.webm is 1 s long; the limit is 0.5 s."


def test_the_service_clamps_frames_to_the_server_cap_and_refuses_videos_a_model_cannot_read(
        tiny_settings, make_engine):
    service = ChatService(make_engine(started=False), replace(tiny_settings, max_video_frames=10), GpuMemory())
    assert service.options(max_num_frames=500).max_num_frames == 10
    assert service.options(max_num_frames=0).max_num_frames == 1
    assert service.rules.video_limits == VideoLimits(max_file_bytes=20 * 2**20, max_seconds=600.0)
    with pytest.raises(InputError, match="max frames setting must be a number"):
        service.options(max_num_frames="all")


def test_an_uploaded_video_is_answered_through_the_service(tiny_settings, make_engine):
    """The whole path a front end takes: an upload in the upload folder, the server's limits,
    the request's frame count, the engine."""
    folder = Path(upload_root()) / "test-videos"
    folder.mkdir(parents=True, exist_ok=True)
    clip = make_clip(folder / "clip.mp4", seconds=4)
    service = ChatService(make_engine(), replace(tiny_settings, max_video_seconds=5), GpuMemory())
    message = {"text": "What happens?", "files": [str(clip)]}
    stream, _ = service.submit(message, [], GREEDY, options=service.options(max_num_frames=3))
    assert stream.result(timeout=60) and stream.stats.tokens > 0
    refused = replace(tiny_settings, max_video_seconds=3)
    with pytest.raises(InputError, match="clip.mp4 is 4 s long; the limit is 3 s."):
        ChatService(make_engine(), refused, GpuMemory()).submit(message, [], GREEDY)


# --- the model -------------------------------------------------------------------------------------
def video_question(video, options: PromptOptions = PromptOptions(), text: str = "What happens?") -> Conversation:
    return Conversation(turns=(Turn("user", text, videos=(video,)),), options=options)


def test_videos_go_through_the_processors_video_path_at_either_detail(tmp_path, loaded_tiny):
    runner = MiniCPMV4Runner(loaded_tiny.runner.model, loaded_tiny.runner.processor)
    video = prepare_video(make_clip(tmp_path / "square.mp4", seconds=3, size=(112, 112)), VideoLimits(), 8)
    config = runner.model.config
    for options, per_frame in ((PromptOptions(), 4), (PromptOptions(downsample_mode="4x"), 16)):
        prompt = runner.encode(video_question(video, options))
        ids = prompt.inputs["input_ids"][0]
        assert int((ids == config.video_token_id).sum()) == 3 * per_frame  # 3 frames, each one whole slice
        assert int((ids == config.image_token_id).sum()) == 0
        text = runner.tokenizer.decode(ids)
        assert "<image_id>" not in text and "<slice>" not in text  # no ids, no slices for video frames
        features = runner._visual_features(prompt, "video")
        assert [f.shape[0] for f in features] == [per_frame] * 3
        assert runner.turn_length(video_question(video, options).turns[0], options) >= prompt.length


def test_a_video_question_answers_in_the_same_batch_as_picture_questions(tmp_path, make_engine, loaded_tiny):
    video = prepare_video(make_clip(tmp_path / "clip.mov", seconds=3), VideoLimits(), 8)
    both = Conversation(turns=(Turn("user", "Compare them.", images=(asset_image("chart.png"),),
                                    videos=(video,)),))
    requests = [video_question(video), Conversation(turns=(Turn("user", "What is it?", images=(asset_image(
        "scene.png"),)),)), both, video_question(video, PromptOptions(downsample_mode="4x"))]
    alone = [make_engine(max_batch=1).submit(request, GREEDY).result(timeout=60) for request in requests]
    engine = make_engine(started=False, max_batch=4)
    streams = [engine.submit(request, GREEDY) for request in requests]
    engine.start()
    assert [s.result(timeout=60) for s in streams] == alone
    assert [s.stats.batch_size for s in streams] == [4, 4, 4, 4]
    assert all(alone) and alone[0] != alone[3], "the fine-detail video read other visual tokens"
