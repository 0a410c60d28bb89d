"""Video intake: every uploaded clip is checked here and turned into a few still frames, once.

MiniCPM-V 4.6 reads a video as a sequence of frames (its processor's video path), so what the
model needs from a file is a handful of evenly spaced pictures, not the stream. Decoding uses
PyAV (FFmpeg's libraries, shipped inside the wheel): it needs no CUDA build to match, unlike
torchcodec, which the model card warns about, and it reads MP4, WebM and MOV alike.

A public demo gets long films, huge resolutions, files that only claim to be videos and
truncated uploads. Each is refused from the container's header where possible (size, duration,
frame size) before anything is decoded, with a `VideoError` whose text a person understands:
the file's base name, never a server path or an FFmpeg trace.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import av
from PIL import Image

from .images import DECODING, check_upload_file
from .mp4_index import Mp4StructureError, index_entries
from .pixel_budget import PixelBudget
from .webm_index import WebmStructureError, cue_entries

logger = logging.getLogger(__name__)

# File types read as videos (by name: a browser upload keeps its suffix, an API data URL gets
# one from its MIME type). Anything else is read as a picture.
VIDEO_SUFFIXES = (".mp4", ".webm", ".mov")
VIDEO_MIME_SUFFIXES = {"video/mp4": ".mp4", "video/webm": ".webm", "video/quicktime": ".mov"}
# The only FFmpeg readers uploads reach, picked from the file's first bytes: MP4/MOV boxes or
# the EBML header of WebM/Matroska. Never letting FFmpeg guess keeps its many rarer readers
# (image sequences, playlists that open other files or URLs) away from untrusted bytes.
EBML_MAGIC = b"\x1a\x45\xdf\xa3"
MP4_BOXES = frozenset({b"ftyp", b"moov", b"mdat", b"wide", b"free", b"skip"})
# Frames are kept with their longer side at most this: MiniCPM-V 4.6 reads each video frame as
# one slice of about 448x448 pixels, so a 1080p frame would only cost memory (6 MB each in
# Pillow against 1 MB here) to be shrunk by the processor anyway.
FRAME_SIDE = 640
# Main frames per second of video, as MiniCPM-V 4.6's own sampler takes them: a short clip gets
# one frame a second, a long one `frames` frames spread evenly over its length.
FRAMES_PER_SECOND = 1.0
# A wanted frame further ahead than this is reached by seeking (to the key frame before it)
# rather than by decoding every frame in between; key frames are usually 1-10 s apart.
SEEK_AFTER_SECONDS = 10.0
# Frames and audio packets a second that a real clip may have (960 fps slow motion fits; audio
# comes in packets of about 1,000 samples, 47 a second for AAC). An MP4 header that claims more
# than this over the longest clip accepted is refused before FFmpeg builds an index entry for
# each claimed sample (see mp4_index.py): at 600 s, 600,000 entries, about 26 MB.
MAX_SAMPLES_PER_SECOND = 1000
# WebM cue points a second: they mark key frames, so even a 60 fps clip made only of key frames
# stays under this. At 600 s, 60,000 cue points cost FFmpeg about 7 MB (see webm_index.py).
MAX_CUES_PER_SECOND = 100
# Videos opened and decoded at once, all threads together; more wait their turn, first come
# first served. FFmpeg's index, its decoder threads and the frames in flight cost tens of MB a
# video, and decoding is CPU work on a server with few cores: more at once would only wait in
# memory. (A reservation counts one video, not pixels.)
VIDEO_DECODES = PixelBudget(2)
# PyAV before 19 raises on container metadata that is not UTF-8 unless told to ignore it; 19
# decodes it leniently by itself and no longer takes the option (Python 3.12 gets 19 from the lock).
OPEN_OPTIONS = {"metadata_errors": "ignore"} if int(av.__version__.split(".")[0]) < 19 else {}


class VideoError(ValueError):
    """An upload we refuse; str(exc) is a short message for the user (base name only)."""


@dataclass(frozen=True)
class VideoLimits:
    max_file_bytes: int = 20 * 1024 * 1024
    max_seconds: float = 600.0
    max_frame_pixels: int = 40_000_000  # a frame larger than this is refused unread (a decoding bomb)


@dataclass(frozen=True)
class PreparedVideo:
    frames: tuple[Image.Image, ...]  # upright RGB, evenly spaced in time, longer side at most FRAME_SIDE
    seconds: float  # the clip's duration
    digest: str  # sha256 of the frames: same frames, same digest, any file
    notices: tuple[str, ...] = ()


def is_video_path(path: str | os.PathLike) -> bool:
    """Whether a file is read as a video (by its suffix, case-insensitive)."""
    return Path(path).suffix.lower() in VIDEO_SUFFIXES


def prepare_video(path: str | os.PathLike, limits: VideoLimits, frames: int) -> PreparedVideo:
    """Check one uploaded clip and take up to `frames` evenly spaced frames from it.

    Raises `VideoError` for anything refused: too large, too long, frames too big, no video
    stream, or bytes FFmpeg cannot decode.
    """
    path = Path(path)
    name = path.name
    check_upload_file(path, name, limits.max_file_bytes, VideoError, "videos")
    demuxer = _demuxer(path, name)
    _check_index_claims(path, name, demuxer, limits)
    with VIDEO_DECODES.reserve(1), _unreadable_as_video_error(name), \
            av.open(str(path), format=demuxer, **OPEN_OPTIONS) as container:
        if not container.streams.video:
            raise VideoError(f"{name} has no video track.")
        stream = container.streams.video[0]
        _check_frame_size(stream, name, limits)
        seconds = _duration(container, stream, name)
        if seconds > limits.max_seconds:
            raise VideoError(f"{name} is {_clock(seconds)} long; the limit is {_clock(limits.max_seconds)}.")
        times = sample_times(seconds, frames)
        # A decoded frame is full size until it is scaled: it counts in the pictures' budget.
        with DECODING.reserve(stream.codec_context.width * stream.codec_context.height):
            stills = tuple(_frames_at(container, stream, times))
    if not stills:
        raise VideoError(f"{name} has no frames that can be decoded.")
    notices = ()
    if len(stills) < len(times):
        notices = (f"{name}: only {len(stills)} of {len(times)} frames could be read.",)
    return PreparedVideo(frames=stills, seconds=seconds, digest=_digest(stills), notices=notices)


def sample_times(seconds: float, frames: int) -> list[float]:
    """When to take frames: one a second, at most `frames`, each in the middle of its share of
    the clip (so a 2 s clip gives its frames at 0.5 s and 1.5 s, not at the very start)."""
    count = max(1, min(frames, math.ceil(seconds * FRAMES_PER_SECOND)))
    return [seconds * (index + 0.5) / count for index in range(count)]




def _demuxer(path: Path, name: str) -> str:
    """FFmpeg's reader for the file, from its first bytes; anything else is refused unread."""
    with open(path, "rb") as file:
        head = file.read(12)
    if head.startswith(EBML_MAGIC):
        return "matroska"
    if head[4:8] in MP4_BOXES:
        return "mov"
    raise VideoError(f"{name} is not an MP4, WebM or MOV video.")


def _check_index_claims(path: Path, name: str, demuxer: str, limits: VideoLimits) -> None:
    """Refuse a file whose index claims more entries than a clip within the limits can have,
    before FFmpeg spends memory on them: every entry points at a byte of the file at least, and
    a clip no longer than the duration limit has at most so many frames (or key frames) a second."""
    per_second = MAX_SAMPLES_PER_SECOND if demuxer == "mov" else MAX_CUES_PER_SECOND
    most = min(path.stat().st_size, math.ceil(limits.max_seconds * per_second))
    try:
        claimed = index_entries(path) if demuxer == "mov" else cue_entries(path, most)
    except (Mp4StructureError, WebmStructureError) as exc:
        logger.info("refused %s: %s", name, exc)
        raise VideoError(f"{name} is damaged or not a video this demo can read (use MP4, WebM or MOV).") from None
    if claimed > most:
        what = "frames and samples" if demuxer == "mov" else "index points"
        raise VideoError(f"{name}'s index claims more {what} than a video within this demo's limits can have "
                         f"({most:,}): it looks damaged.")


def _check_frame_size(stream, name: str, limits: VideoLimits) -> None:
    width, height = stream.codec_context.width, stream.codec_context.height
    if width * height > limits.max_frame_pixels:
        raise VideoError(f"{name} has frames of {width}x{height} pixels, too many to decode "
                         f"(the limit is {limits.max_frame_pixels / 1e6:.3g} megapixels).")


def _duration(container, stream, name: str) -> float:
    """Seconds, from the header when it says (MP4 and MOV do), else from the packets' times,
    which needs reading but not decoding (browser-recorded WebM often has no duration)."""
    if stream.duration is not None and stream.time_base:
        return float(stream.duration * stream.time_base)
    if container.duration:
        return container.duration / av.time_base
    end = 0.0
    for packet in container.demux(stream):
        if packet.pts is not None and packet.time_base:
            end = max(end, float((packet.pts + (packet.duration or 0)) * packet.time_base))
    container.seek(0)
    if end <= 0:
        raise VideoError(f"{name} has no frames that can be decoded.")
    return end


def _frames_at(container, stream, times: list[float]) -> Iterator[Image.Image]:
    """Decode the frame showing at each of `times`, in order.

    Frames that are not taken are decoded but never converted, and a long gap before the next
    wanted frame is jumped by seeking to the key frame before it, so a long film costs about
    `len(times)` stretches of decoding, not the whole film. A clip with fewer frames than
    asked for gives one still per frame.
    """
    stream.thread_type = "AUTO"
    pending = list(times)
    half = _frame_seconds(stream) / 2
    while pending:
        for frame in container.decode(stream):
            time = frame.time if frame.time is not None else 0.0
            if time + half < pending[0]:
                continue
            yield _still(frame)
            while pending and pending[0] <= time + half:
                pending.pop(0)
            if not pending:
                return
            if pending[0] - time > SEEK_AFTER_SECONDS:
                container.seek(int(pending[0] / stream.time_base), stream=stream, backward=True)
                break  # decode again from the key frame the seek landed on
        else:
            return  # the stream ended before the last wanted time



def _frame_seconds(stream) -> float:
    rate = stream.average_rate or stream.guessed_rate
    return 1.0 / float(rate) if rate else 0.0


def _still(frame) -> Image.Image:
    """One decoded frame as an upright RGB picture, scaled by FFmpeg to at most FRAME_SIDE.

    Phones store portrait video as landscape frames plus a display rotation; turned here, as a
    player would show it, so the model does not see people lying on their side.
    """
    width, height = frame.width, frame.height
    scale = min(1.0, FRAME_SIDE / max(width, height))
    image = frame.to_image(width=max(2, round(width * scale)), height=max(2, round(height * scale)))
    return image.rotate(frame.rotation, expand=True) if frame.rotation else image  # both counterclockwise


@contextmanager
def _unreadable_as_video_error(name: str) -> Iterator[None]:
    """FFmpeg's many ways of failing on bad bytes, as one human message."""
    try:
        yield
    except VideoError:
        raise
    except (av.error.FFmpegError, OSError, ValueError, EOFError, IndexError) as exc:
        logger.info("refused %s: %s: %s", name, type(exc).__name__, exc)
        raise VideoError(f"{name} is damaged or not a video this demo can read (use MP4, WebM or MOV).") from exc


def _digest(frames: tuple[Image.Image, ...]) -> str:
    """Identify the frames, not the file: the runner caches processed frames and vision
    features by this."""
    hasher = hashlib.sha256(f"video:{len(frames)}:".encode())
    for frame in frames:
        hasher.update(f"{frame.width}x{frame.height}:".encode())
        hasher.update(frame.tobytes())
    return hasher.hexdigest()


def _clock(seconds: float) -> str:
    minutes, rest = divmod(round(seconds), 60)
    return f"{minutes}:{rest:02d} min" if minutes else f"{seconds:.3g} s"
