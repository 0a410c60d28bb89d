"""Short video clips written with PyAV for the tests: each second has its own colour, so a
test can read which second a sampled frame came from."""

from __future__ import annotations

import struct
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

CODECS = {".mp4": "libx264", ".mov": "libx264", ".webm": "libvpx-vp9"}


def second_shade(second: int) -> int:
    """The blue value of every pixel during `second` (what `make_clip` writes)."""
    return 20 + 5 * second


def make_clip(path: Path, seconds: int = 2, fps: int = 10, size: tuple[int, int] = (96, 64),
              rotation: int = 0) -> Path:
    """Write a `seconds`-long clip (at most 45) whose frames are blue by second (see
    `second_shade`), with a green left half, shown turned `rotation` degrees counterclockwise
    (as a phone marks portrait video)."""
    return _write_clip(path, seconds, fps, size, rotation)


def make_clip_with_sound(path: Path, codec: str, seconds: int = 2) -> Path:
    """A `make_clip` clip with a silent 48 kHz stereo track in `codec` ("aac", "pcm_s16le", ...)."""
    return _write_clip(path, seconds, sound=codec)


def make_fragmented_clip(path: Path, seconds: int = 2) -> Path:
    """A `make_clip` MP4 written in fragments (moof boxes after an empty moov), as streamers do."""
    return _write_clip(path, seconds, options={"movflags": "frag_keyframe+empty_moov"})


def _write_clip(path: Path, seconds: int = 2, fps: int = 10, size: tuple[int, int] = (96, 64),
                rotation: int = 0, sound: str = "", options: dict | None = None) -> Path:
    """`make_clip`, with a silent `sound` track (an audio codec's name) and muxer `options`."""
    with av.open(str(path), "w", options=options or {}) as container:
        stream = container.add_stream(CODECS[path.suffix], rate=fps)
        stream.width, stream.height, stream.pix_fmt = size[0], size[1], "yuv420p"
        if rotation:
            stream.set_display_rotation(rotation)
        audio = container.add_stream(sound, rate=48_000, layout="stereo") if sound else None
        for index in range(seconds * fps):
            pixels = np.zeros((size[1], size[0], 3), np.uint8)
            pixels[..., 2] = second_shade(index // fps)
            pixels[:, : size[0] // 2, 1] = 200
            pixels[..., 0] = 40 * (index % fps) // fps  # frames within a second differ a little
            for packet in stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
        if audio is not None:
            _write_silence(container, audio, seconds)
    return path


def _write_silence(container, stream, seconds: int) -> None:
    rate, samples = stream.rate, 1024
    for index in range(seconds * rate // samples):
        frame = av.AudioFrame(format=stream.format.name, layout="stereo", samples=samples)
        for plane in frame.planes:
            plane.update(bytes(plane.buffer_size))
        frame.sample_rate, frame.pts, frame.time_base = rate, index * samples, Fraction(1, rate)
        for packet in stream.encode(frame):
            container.mux(packet)
    for packet in stream.encode():
        container.mux(packet)


def frame_second(frame) -> int:
    """Which second of a `make_clip` clip a decoded frame shows (from its blue value)."""
    blue = float(np.asarray(frame)[..., 2].mean())
    return round((blue - 20) / 5)


# --- index bombs: tiny files whose headers claim millions of samples -------------------------------
MP4_CONTAINERS = {b"moov", b"trak", b"mdia", b"minf", b"stbl", b"moof", b"traf"}


def make_index_bomb(path: Path, samples: int, fragmented: bool = False) -> Path:
    """A playable-looking MP4 of a few KB whose header claims `samples` frames: a one-second clip
    whose sample tables say so with one run (`stts`) and a constant sample size (`stsz`), or,
    `fragmented`, whose first fragment run (`trun`) says so without per-sample fields."""
    if fragmented:
        make_fragmented_clip(path, seconds=1)
    else:
        make_clip(path, seconds=1, fps=1)
    boxes = _mp4_boxes(path.read_bytes())

    def claim(box: list) -> None:
        kind = box[0]
        if kind == b"stts" and not fragmented:
            box[1] = struct.pack(">IIII", 0, 1, samples, 1)
        elif kind == b"stsz" and not fragmented:
            box[1] = struct.pack(">IIII", 0, 1, samples, 0)[:12]
        elif kind == b"stsc" and not fragmented:
            box[1] = struct.pack(">IIIII", 0, 1, 1, samples, 1)
        elif kind in (b"ctts", b"stss") and not fragmented:
            box[0] = b"free"
        elif kind == b"trun" and fragmented:
            data_offset = struct.unpack(">I", box[1][8:12])[0]
            box[1] = struct.pack(">III", 0x000001, samples, data_offset)

    _visit(boxes, claim)
    path.write_bytes(_mp4_bytes(boxes))
    return path


def make_cue_bomb(path: Path, cue_points: int) -> Path:
    """A WebM clip with `cue_points` cue points (an index FFmpeg reads whole at open) put before
    its first cluster; its segment's size is marked unknown so that it still adds up."""
    make_clip(path, seconds=1, fps=2)
    data = bytearray(path.read_bytes())
    segment = data.index(bytes.fromhex("18538067")) + 4
    width = 9 - data[segment].bit_length()
    data[segment:segment + width] = bytes([0x01]) + b"\xff" * 7  # unknown size (8 bytes)
    cluster = data.index(bytes.fromhex("1F43B675"))
    point = bytes.fromhex("BB8E B384") + b"%s" + bytes.fromhex("B786 F78101 F18101")
    body = b"".join(point.replace(b"%s", (i % 100_000).to_bytes(4, "big")) for i in range(cue_points))
    data[cluster:cluster] = bytes.fromhex("1C53BB6B 01") + len(body).to_bytes(7, "big") + body
    path.write_bytes(bytes(data))
    return path


def _mp4_boxes(data: bytes) -> list[list]:
    boxes, position = [], 0
    while position + 8 <= len(data):
        size, kind = struct.unpack(">I4s", data[position:position + 8])
        body = data[position + 8:position + size]
        boxes.append([kind, _mp4_boxes(body) if kind in MP4_CONTAINERS else body])
        position += size
    return boxes


def _mp4_bytes(boxes: list[list]) -> bytes:
    out = b""
    for kind, body in boxes:
        payload = _mp4_bytes(body) if isinstance(body, list) else body
        out += struct.pack(">I4s", 8 + len(payload), kind) + payload
    return out


def _visit(boxes: list[list], change) -> None:
    for box in boxes:
        change(box)
        if isinstance(box[1], list):
            _visit(box[1], change)
