"""Image intake against a bad-input corpus generated here (nothing downloaded)."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from minicpmv_demo.images import ImageError, ImageLimits, prepare_image


def save(path: Path, image: Image.Image, **options) -> Path:
    image.save(path, **options)
    return path


def write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def png_header_only(path: Path, width: int, height: int) -> Path:
    """A tiny valid PNG whose header claims `width` x `height`: a decompression bomb's calling card."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))
    return path


@pytest.mark.parametrize("make, message", [
    (lambda d: d / "missing.png", "could not be found"),
    (lambda d: write(d / "empty.png", b""), "is empty"),
    (lambda d: write(d / "notes.png", b"hello, not a picture"), "not an image"),
    (lambda d: write(d / "noise.jpg", bytes(range(256)) * 40), "not an image"),
    (lambda d: png_header_only(d / "bomb.png", 100_000, 100_000), "too large to open"),
])
def test_refused_with_a_clear_message(tmp_path, make, message):
    with pytest.raises(ImageError, match=message) as caught:
        prepare_image(make(tmp_path))
    text = str(caught.value)
    assert "Traceback" not in text and str(tmp_path) not in text and len(text) < 200


def test_truncated_files_are_refused(tmp_path):
    for name, fmt in (("cut.png", "PNG"), ("cut.jpg", "JPEG")):
        buffer = io.BytesIO()
        Image.effect_noise((256, 256), 60).convert("RGB").save(buffer, format=fmt)
        (tmp_path / name).write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
        with pytest.raises(ImageError, match="damaged or truncated|not an image"):
            prepare_image(tmp_path / name)


def test_file_over_the_size_limit(tmp_path):
    path = save(tmp_path / "big.png", Image.effect_noise((300, 300), 80))
    with pytest.raises(ImageError, match=r"the limit is 0 MB|limit is"):
        prepare_image(path, ImageLimits(max_file_bytes=1000))


def test_huge_image_is_scaled_down_with_a_notice(tmp_path):
    path = save(tmp_path / "wide.png", Image.new("RGB", (4000, 2000), (10, 200, 30)))
    prepared = prepare_image(path)
    assert prepared.image.size == (1344, 672)
    assert "scaled down from 4000x2000" in prepared.notices[0]


@pytest.mark.parametrize("size", [(1, 1), (10000, 10), (10, 3000)])
def test_tiny_and_thin_images_become_usable(tmp_path, size):
    prepared = prepare_image(save(tmp_path / "thin.png", Image.new("L", size, 0)))
    assert min(prepared.image.size) >= 28 and max(prepared.image.size) <= 1344
    assert prepared.image.mode == "RGB" and prepared.notices


def test_animated_gif_uses_its_first_frame(tmp_path):
    frames = [Image.new("RGB", (64, 64), color) for color in ((255, 0, 0), (0, 0, 255))]
    path = tmp_path / "anim.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=100, loop=0)
    prepared = prepare_image(path)
    assert prepared.image.getpixel((5, 5))[0] > 200  # red, the first frame
    assert "animated" in prepared.notices[0]


@pytest.mark.parametrize("mode", ["CMYK", "P", "RGBA", "LA", "1", "L", "I;16", "I", "F"])
def test_every_mode_ends_as_rgb(tmp_path, mode):
    gradient = np.tile(np.linspace(0, 1, 64), (48, 1))
    if mode in ("I;16", "I", "F"):
        scale = {"I;16": 65535, "I": 1_000_000, "F": 1.0}[mode]
        array = (gradient * scale).astype({"I;16": np.uint16, "I": np.int32, "F": np.float32}[mode])
        image = Image.fromarray(array, mode=mode)
    else:
        image = Image.fromarray((gradient * 255).astype(np.uint8), mode="L").convert(mode)
    ext = "tif" if mode in ("CMYK", "I", "F") else "png"
    prepared = prepare_image(save(tmp_path / f"img.{ext}", image))
    assert prepared.image.mode == "RGB" and prepared.image.size == (64, 48)
    left, right = prepared.image.getpixel((0, 10)), prepared.image.getpixel((63, 10))
    if mode not in ("1",):
        assert sum(right) != sum(left), "the picture's content survived the conversion"


def test_transparency_is_flattened_on_white(tmp_path):
    image = Image.new("RGBA", (40, 40), (255, 0, 0, 0))
    image.putpixel((0, 0), (0, 0, 255, 255))
    prepared = prepare_image(save(tmp_path / "alpha.png", image))
    assert prepared.image.getpixel((20, 20)) == (255, 255, 255)
    assert prepared.image.getpixel((0, 0)) == (0, 0, 255)
    palette = Image.new("P", (40, 40), 0)
    palette.putpalette([10, 20, 30, 200, 0, 0] + [0] * 762)
    palette.info["transparency"] = 0
    assert prepare_image(save(tmp_path / "pal.png", palette, transparency=0)).image.getpixel((1, 1)) == (255, 255, 255)


def test_exif_orientation_is_applied(tmp_path):
    image = Image.new("RGB", (80, 40), (0, 128, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    prepared = prepare_image(save(tmp_path / "phone.jpg", image, exif=exif))
    assert prepared.image.size == (40, 80)


def test_same_pixels_same_digest_whatever_the_file(tmp_path):
    image = Image.effect_noise((50, 40), 50).convert("RGB")
    png = prepare_image(save(tmp_path / "a.png", image))
    bmp = prepare_image(save(tmp_path / "b.bmp", image))
    other = prepare_image(save(tmp_path / "c.png", image.rotate(90)))
    assert png.digest == bmp.digest != other.digest
