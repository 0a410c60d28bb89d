"""Short video clips written with PyAV for the tests: each second has its own colour, so a
test can read which second a sampled frame came from."""

from __future__ import annotations

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
    with av.open(str(path), "w") as container:
        stream = container.add_stream(CODECS[path.suffix], rate=fps)
        stream.width, stream.height, stream.pix_fmt = size[0], size[1], "yuv420p"
        if rotation:
            stream.set_display_rotation(rotation)
        for index in range(seconds * fps):
            pixels = np.zeros((size[1], size[0], 3), np.uint8)
            pixels[..., 2] = second_shade(index // fps)
            pixels[:, : size[0] // 2, 1] = 200
            pixels[..., 0] = 40 * (index % fps) // fps  # frames within a second differ a little
            for packet in stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def frame_second(frame) -> int:
    """Which second of a `make_clip` clip a decoded frame shows (from its blue value)."""
    blue = float(np.asarray(frame)[..., 2].mean())
    return round((blue - 20) / 5)
