"""Image intake against a bad-input corpus generated here with Pillow (nothing downloaded)."""

from __future__ import annotations

import io
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from minicpmv_demo.intake.images import ImageError, ImageLimits, PreparedImage, prepare_image

RED, BLUE, WHITE = (255, 0, 0), (0, 0, 255), (255, 255, 255)


def save(path: Path, image: Image.Image, **options) -> Path:
    image.save(path, **options)
    return path


def write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def encoded(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def png_claiming(path: Path, width: int, height: int) -> Path:
    """A valid ~70-byte PNG whose header claims `width` x `height`: a decompression bomb's shape."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit greyscale
    return write(path, b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
                 + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))


def noise(size: tuple[int, int] = (128, 96)) -> Image.Image:
    return Image.effect_noise(size, 60).convert("RGB")


def refusal(path: Path, limits: ImageLimits = ImageLimits()) -> str:
    """The message shown for a refused file, checked to be fit for a user's eyes."""
    with pytest.raises(ImageError) as caught:
        prepare_image(path, limits)
    text = str(caught.value)
    assert text.startswith(path.name), text  # says which file
    assert "Traceback" not in text and "Error" not in text and "\n" not in text, text
    assert str(path.parent) not in text and len(text) < 160, text
    return text


# --- refused files --------------------------------------------------------------------------


def test_missing_and_empty_files(tmp_path):
    assert "could not be found" in refusal(tmp_path / "gone.png")
    assert "could not be found" in refusal(tmp_path)  # a folder is not a file either
    assert "is empty" in refusal(write(tmp_path / "empty.png", b""))


def test_file_over_the_size_limit_names_the_limit_in_mb(tmp_path):
    path = save(tmp_path / "big.png", noise((300, 300)))
    text = refusal(path, ImageLimits(max_file_bytes=2**20 // 8))
    assert "the limit is 0.125 MB" in text
    path = save(tmp_path / "huge.png", noise((1200, 1200)))  # ~4 MB of noise
    assert "the limit is 2 MB" in refusal(path, ImageLimits(max_file_bytes=2 * 2**20))


@pytest.mark.parametrize("name, data", [
    ("notes.png", b"hello, this is a text file and not a picture\n" * 20),
    ("noise.jpg", bytes(range(256)) * 40),
    ("script.png", b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n"),  # EPS is never parsed
    ("zero.png", None),  # a PNG header claiming 0x0 pixels
])
def test_non_images_with_image_names(tmp_path, name, data):
    path = png_claiming(tmp_path / name, 0, 0) if data is None else write(tmp_path / name, data)
    assert "is not an image this demo can read" in refusal(path)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "GIF", "WEBP"])
def test_truncated_files_are_refused(tmp_path, fmt):
    data = encoded(noise() if fmt != "GIF" else noise().convert("P"), fmt)
    path = write(tmp_path / f"cut.{fmt.lower()}", data[: len(data) * 2 // 3])
    assert "damaged or truncated" in refusal(path)


def test_corrupt_image_data_is_refused(tmp_path):
    data = bytearray(encoded(noise(), "PNG"))
    data[len(data) // 2: len(data) // 2 + 400] = b"\xff" * 400  # garbage inside the compressed pixels
    assert "damaged or truncated" in refusal(write(tmp_path / "corrupt.png", bytes(data)))


@pytest.mark.parametrize("width, height", [
    (8000, 6000),  # 48 MP: over our limit, under Pillow's own
    (10_000, 10_000),  # 100 MP: Pillow warns, we refuse
    (100_000, 100_000),  # 10 GP: Pillow refuses while opening
])
@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_decompression_bombs_are_refused_from_the_header(tmp_path, width, height):
    path = png_claiming(tmp_path / "bomb.png", width, height)
    assert path.stat().st_size < 200
    text = refusal(path)
    assert "too many" in text and "the limit is 40 megapixels" in text


def test_decompression_bomb_warning_raised_as_error_is_caught(tmp_path):
    path = png_claiming(tmp_path / "bomb.png", 10_000, 10_000)
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        assert "too many pixels" in refusal(path, ImageLimits(max_pixels=10**9))


def test_too_small_for_the_configured_minimum(tmp_path):
    path = save(tmp_path / "dot.png", Image.new("RGB", (3, 3)))
    assert "too small" in refusal(path, ImageLimits(min_side=4))


def test_too_many_images_in_one_message(tmp_path):
    from minicpmv_demo.intake.message import InputError, InputRules, build_conversation

    paths = [str(save(tmp_path / f"{i}.png", Image.new("RGB", (32, 32), RED))) for i in range(7)]
    rules = InputRules(image_limits=ImageLimits(), max_images=4, allowed_roots=(str(tmp_path),))
    with pytest.raises(InputError) as caught:
        build_conversation({"text": "all of them?", "files": paths}, [], system_prompt="", rules=rules)
    assert str(caught.value) == "Too many images in one message: 7 (the limit is 4)."
    conversation, _ = build_conversation({"text": "these?", "files": paths[:4]}, [], system_prompt="", rules=rules)
    assert len(conversation.images()) == 4 and all(isinstance(p, PreparedImage) for p in conversation.images())


# --- normalised files -----------------------------------------------------------------------


def test_huge_image_is_downscaled_keeping_its_aspect(tmp_path):
    prepared = prepare_image(save(tmp_path / "wide.png", Image.new("RGB", (4000, 2000), (10, 200, 30))))
    assert prepared.image.size == (1344, 672)
    assert prepared.notices == ("wide.png was downscaled from 4000x2000 to 1344x672.",)
    assert prepared.image.getpixel((600, 300)) == (10, 200, 30)


@pytest.mark.parametrize("size, expected", [
    ((1, 1), (28, 28)),
    ((10_000, 10), (1344, 68)),  # downscaled to 1344x1, then padded to a 1:20 ratio
    ((10, 3000), (68, 1344)),
    ((400, 10), (400, 28)),
    ((60, 40), (60, 40)),  # small but fine: untouched
])
def test_tiny_and_thin_images_are_padded_on_white(tmp_path, size, expected):
    prepared = prepare_image(save(tmp_path / "thin.png", Image.new("L", size, 0)))
    assert prepared.image.mode == "RGB" and prepared.image.size == expected
    if size == expected:
        assert prepared.notices == ()
        return
    assert "padded with white" in prepared.notices[-1]
    assert prepared.image.getpixel((0, 0)) == WHITE  # corner: padding
    assert prepared.image.convert("L").getextrema()[0] == 0  # the black content is still there


@pytest.mark.parametrize("fmt, options", [
    ("gif", {}),
    ("webp", {"lossless": True}),
    ("png", {}),  # APNG
])
def test_animations_use_their_first_frame(tmp_path, fmt, options):
    first, second = Image.new("RGB", (64, 64), RED), Image.new("RGB", (64, 64), BLUE)
    path = save(tmp_path / f"anim.{fmt}", first, save_all=True, append_images=[second], duration=100,
                loop=0, **options)
    prepared = prepare_image(path)
    assert prepared.image.getpixel((5, 5)) == RED
    assert prepared.notices == (f"anim.{fmt} is animated: using its first frame.",)


def gradient(mode: str) -> Image.Image:
    """A left-to-right ramp in `mode`, from 0 to the mode's natural top."""
    ramp = np.tile(np.linspace(0, 1, 64), (48, 1))
    deep = {"I;16": (65535, np.uint16), "I": (1_000_000, np.int32), "F": (1.0, np.float32)}
    if mode in deep:
        top, dtype = deep[mode]
        return Image.fromarray((ramp * top).astype(dtype))  # the dtype picks the mode
    return Image.fromarray((ramp * 255).astype(np.uint8)).convert(mode)


@pytest.mark.parametrize("mode, ext", [
    ("CMYK", "jpg"), ("P", "png"), ("RGBA", "png"), ("LA", "png"), ("1", "png"), ("L", "png"),
    ("I;16", "png"), ("I", "tif"), ("F", "tif"),
])
def test_every_mode_ends_as_rgb(tmp_path, mode, ext):
    path = save(tmp_path / f"img.{ext}", gradient(mode))
    with Image.open(path) as reopened:
        assert reopened.mode == mode  # the file really is in that mode
    prepared = prepare_image(path)
    assert prepared.image.mode == "RGB" and prepared.image.size == (64, 48) and prepared.notices == ()
    dark, light = prepared.image.getpixel((0, 10)), prepared.image.getpixel((63, 10))
    assert max(dark) < 40 and min(light) > 215, (dark, light)  # the ramp survived, scaled to 8 bits


def test_deep_images_are_scaled_by_their_maximum(tmp_path):
    twelve_bit = Image.fromarray(np.tile(np.linspace(0, 4095, 64), (32, 1)).astype(np.uint16))
    prepared = prepare_image(save(tmp_path / "sensor.png", twelve_bit))
    assert prepared.image.getpixel((0, 0)) == (0, 0, 0) and prepared.image.getpixel((63, 0)) == WHITE
    small = Image.fromarray(np.full((32, 64), 100, dtype=np.int32))  # already in 8-bit range
    assert prepare_image(save(tmp_path / "small.tif", small)).image.getpixel((0, 0)) == (100, 100, 100)


def test_transparency_is_flattened_on_white(tmp_path):
    rgba = Image.new("RGBA", (40, 40), (255, 0, 0, 0))
    rgba.putpixel((0, 0), (0, 0, 255, 255))
    prepared = prepare_image(save(tmp_path / "alpha.png", rgba)).image
    assert prepared.getpixel((20, 20)) == WHITE and prepared.getpixel((0, 0)) == BLUE

    palette = Image.new("P", (40, 40), 0)
    palette.putpalette([10, 20, 30, 200, 0, 0] + [0] * 762)
    palette.putpixel((0, 0), 1)
    prepared = prepare_image(save(tmp_path / "pal.png", palette, transparency=0)).image
    assert prepared.getpixel((20, 20)) == WHITE and prepared.getpixel((0, 0)) == (200, 0, 0)

    grey_alpha = Image.new("LA", (40, 40), (0, 0))
    assert prepare_image(save(tmp_path / "la.png", grey_alpha)).image.getpixel((5, 5)) == WHITE


def test_exif_orientation_is_applied(tmp_path):
    image = Image.new("RGB", (80, 40), RED)
    image.paste(BLUE, (40, 0, 80, 40))  # left half red, right half blue
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display", as phones write it
    prepared = prepare_image(save(tmp_path / "phone.jpg", image, exif=exif, quality=95))
    assert prepared.image.size == (40, 80)
    top, bottom = prepared.image.getpixel((20, 10)), prepared.image.getpixel((20, 70))
    assert top[0] > 200 > top[2] and bottom[2] > 200 > bottom[0]  # the left half is now on top


def test_same_pixels_give_the_same_digest_whatever_the_file(tmp_path):
    image = noise((50, 40))
    png = prepare_image(save(tmp_path / "a.png", image))
    bmp = prepare_image(save(tmp_path / "b.bmp", image))
    tif = prepare_image(save(tmp_path / "c.tif", image.convert("RGBA")))  # opaque alpha: same picture
    other = prepare_image(save(tmp_path / "d.png", image.rotate(90)))
    assert len(png.digest) == 64
    assert png.digest == bmp.digest == tif.digest != other.digest


def test_pillow_global_state_is_left_alone(tmp_path):
    before = (ImageFile.LOAD_TRUNCATED_IMAGES, Image.MAX_IMAGE_PIXELS, list(warnings.filters))
    data = encoded(noise(), "JPEG")
    with pytest.raises(ImageError):
        prepare_image(write(tmp_path / "cut.jpg", data[: len(data) // 2]))
    prepare_image(save(tmp_path / "ok.png", noise()))
    assert (ImageFile.LOAD_TRUNCATED_IMAGES, Image.MAX_IMAGE_PIXELS, list(warnings.filters)) == before
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_the_same_picture_is_prepared_once_whatever_its_path(tmp_path, monkeypatch):
    from minicpmv_demo.intake import message

    calls = []
    real = message.prepare_image
    monkeypatch.setattr(message, "prepare_image", lambda path, limits: calls.append(path) or real(path, limits))
    rules = message.InputRules(image_limits=ImageLimits(), max_images=4, allowed_roots=(str(tmp_path),))
    picture = Image.effect_noise((64, 48), 40).convert("RGB")
    for folder in ("upload-1", "upload-2"):  # the same file uploaded twice lands in two folders
        (tmp_path / folder).mkdir()
        save(tmp_path / folder / "photo.png", picture)
        message.build_conversation({"text": "?", "files": [str(tmp_path / folder / "photo.png")]}, [],
                                   system_prompt="", rules=rules)
    assert len(calls) == 1
