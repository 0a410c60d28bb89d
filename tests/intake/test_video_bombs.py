"""Videos made to exhaust the server: headers that claim millions of samples, and many videos at
once. Each bomb is a real file built here; it is opened in a fresh process, whose peak memory
says whether FFmpeg built the claimed index."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from clips import make_clip, make_clip_with_sound, make_cue_bomb, make_fragmented_clip, make_index_bomb
from conftest import wait_until
from minicpmv_demo.intake.videos import VIDEO_DECODES, VideoLimits, prepare_video

ROOT = Path(__file__).resolve().parents[2]
# Opens one video in a process of its own and prints what came of it and how much its peak
# memory grew: FFmpeg's index of a 10-million-frame claim alone would take 350 MB.
OPEN_ALONE = """
import json, resource, sys
from minicpmv_demo.intake.videos import VideoLimits, prepare_video
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
try:
    prepare_video(sys.argv[1], VideoLimits(), 8)
    outcome = "accepted"
except ValueError as exc:
    outcome = str(exc)
print(json.dumps({"outcome": outcome, "growth_mb": (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024}))
"""


def open_alone(path: Path) -> dict:
    done = subprocess.run([sys.executable, "-c", OPEN_ALONE, str(path)], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("bomb", ["mp4 tables", "mp4 fragment", "webm cues"])
def test_an_index_bomb_is_refused_before_ffmpeg_builds_its_index(tmp_path, bomb):
    if bomb == "webm cues":  # 19 MB of cue points: under the 20 MB upload limit
        path = make_cue_bomb(tmp_path / "bomb.webm", 1_200_000)
    else:  # a few KB claiming 10 million frames
        path = make_index_bomb(tmp_path / "bomb.mp4", 10_000_000, fragmented=bomb == "mp4 fragment")
    result = open_alone(path)
    assert result["outcome"].startswith(f"{path.name}'s index claims more") and "looks damaged" in result["outcome"]
    assert result["growth_mb"] < 40, result


def test_real_clips_with_sound_fragments_or_long_pcm_pass_the_index_check(tmp_path):
    """What real files carry is within the bound: AAC, 20 s of uncompressed audio (which FFmpeg
    indexes by chunk), a fragmented MP4, a long clip."""
    clips = [make_clip_with_sound(tmp_path / "aac.mp4", "aac", seconds=3),
             make_clip_with_sound(tmp_path / "pcm.mov", "pcm_s16le", seconds=20),
             make_fragmented_clip(tmp_path / "fragments.mp4", seconds=3),
             make_clip(tmp_path / "long.webm", seconds=40, fps=2)]
    for clip in clips:
        assert prepare_video(clip, VideoLimits(), 4).frames, clip.name


def test_a_table_longer_than_its_box_is_refused_as_damaged(tmp_path):
    clip = make_clip(tmp_path / "clip.mp4", seconds=1)
    data = bytearray(clip.read_bytes())
    stts = data.index(b"stts")
    struct.pack_into(">I", data, stts + 8, 1_000_000)  # the entry count, with one entry in the box
    clip.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="clip.mp4 is damaged or not a video this demo can read"):
        prepare_video(clip, VideoLimits(), 4)


def test_only_a_few_videos_are_opened_and_decoded_at_once(tmp_path):
    """With every place taken, the next video waits for one (first come, first served) and is
    then read as usual."""
    clip = make_clip(tmp_path / "clip.mp4", seconds=2)
    result: list = []
    with VIDEO_DECODES.reserve(VIDEO_DECODES.capacity):
        reader = threading.Thread(target=lambda: result.append(prepare_video(clip, VideoLimits(), 2)))
        reader.start()
        assert wait_until(lambda: VIDEO_DECODES.waiting == 1, timeout=30)
        assert not result, "it waited for a place"
    reader.join(60)
    assert len(result[0].frames) == 2 and VIDEO_DECODES.in_use == 0
