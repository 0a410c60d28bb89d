"""Image intake: every upload is checked and normalised here, once, before the model sees it.

A public demo gets every kind of file: corrupt or truncated ones, text files named .png,
decompression bombs, 16-bit scans, CMYK print files, animated GIFs, phone photos lying on their
side, 1-pixel spacers. Each either becomes a plain RGB picture of a size the vision tower can
use, with a short note when something was changed, or is refused with an `ImageError` whose
text a person understands (the file's base name, never a server path or a traceback).

Global Pillow state is left as Pillow ships it, on purpose:
- `ImageFile.LOAD_TRUNCATED_IMAGES` stays False, so a truncated file fails while decoding here
  instead of reaching the model as a half-grey picture;
- `Image.MAX_IMAGE_PIXELS` is not changed: our own, lower `ImageLimits.max_pixels` is checked
  from the header before decoding, and Pillow's check stays as a second line of defence (so a
  `max_pixels` above about 179 megapixels would still be refused by Pillow itself);
- no warning filters are touched (they are process-wide, and uploads are handled on several
  threads at once): a `DecompressionBombWarning` turned into an error elsewhere is caught too.
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

import numpy as np
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

from .pixel_budget import PixelBudget
from ..system.process_memory import trim

logger = logging.getLogger(__name__)

# Formats a browser can produce or show. Naming them keeps Pillow's rarer parsers (and EPS,
# which runs Ghostscript) away from untrusted bytes. Phone photos in MPO come in through JPEG.
ALLOWED_FORMATS = ("PNG", "JPEG", "GIF", "WEBP", "BMP", "TIFF")
# Vision towers cut 14-px patches and their processors choke on near-empty sides or extreme
# aspect ratios, so thin images are padded until the short side reaches both of these.
MIN_SHORT_SIDE = 28
MAX_ASPECT_RATIO = 20
# 16/32-bit integer and float modes, which have no direct 8-bit RGB conversion worth using.
DEEP_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I", "F"})
# EXIF orientations that turn the picture by a quarter (width and height swap).
QUARTER_TURNS = frozenset({5, 6, 7, 8})
# Pixels being decoded at once, all threads together: two pictures at the default 40 MP limit.
# Decoding is CPU work and a demo server has few cores, so more at once would only wait in
# memory. 80 MP are 320 MB in Pillow (4 bytes a pixel, RGB too), at most twice that while a
# transparent picture is flattened: with a burst's other buffers, well under 1.5 GB.
DECODING = PixelBudget(80_000_000)


class ImageError(ValueError):
    """An upload we refuse; str(exc) is a short, human message shown in the UI (no traceback, no
    server paths except the file's base name)."""


@dataclass(frozen=True)
class ImageLimits:
    max_file_bytes: int = 20 * 1024 * 1024
    max_pixels: int = 40_000_000  # decoded pixel count above which we refuse (decompression bombs)
    max_side: int = 1344  # longer side is downscaled to this (what MiniCPM-V uses)
    min_side: int = 1  # anything smaller is refused


@dataclass(frozen=True)
class PreparedImage:
    image: Image.Image  # RGB, EXIF orientation applied, at most max_side on the longer side
    digest: str  # sha256 of the normalised pixels + size + mode: same picture, same digest, any file
    notices: tuple[str, ...] = ()  # short notes for the user about what was changed


def prepare_image(path: str | os.PathLike, limits: ImageLimits = ImageLimits()) -> PreparedImage:
    """Validate one uploaded file and return it as an upright RGB picture the model can take.

    Raises `ImageError` for anything we refuse; every change we make is described in `notices`.
    """
    path = Path(path)
    name = path.name
    check_upload_file(path, name, limits.max_file_bytes, ImageError)
    image, size, frames_notice = _decode(path, name, limits)
    notices = [frames_notice] if frames_notice else []
    if image.size != size:
        trim()  # the full-size picture is freed: what decoding it left in malloc goes back too
        notices.append(f"{name} was downscaled from {_size(size)} to {_size(image.size)}.")
    image, original = _pad_to_usable(image)
    if original:
        notices.append(f"{name} is very small or thin ({_size(original)}): "
                       f"padded with white to {_size(image.size)}.")
    return PreparedImage(image=image, digest=_digest(image), notices=tuple(notices))


def check_upload_file(path: Path, name: str, max_bytes: int, error: type[ValueError], kind: str = "") -> None:
    """Cheap checks on an uploaded file itself (pictures, videos), so oversized uploads are
    refused without being read; `error` carries the message, `kind` names the limit's kind."""
    if not path.is_file():
        raise error(f"{name} could not be found on the server; please upload it again.")
    size = path.stat().st_size
    if size == 0:
        raise error(f"{name} is empty (0 bytes).")
    if size > max_bytes:
        limit = f"the limit for {kind} is" if kind else "the limit is"
        raise error(f"{name} is {_megabytes(size)} MB; {limit} {_megabytes(max_bytes)} MB.")


def _decode(path: Path, name: str, limits: ImageLimits) -> tuple[Image.Image, tuple[int, int], str | None]:
    """Decode the first frame as upright RGB, at most `max_side` on the longer side; returns it,
    its full size upright, and a notice when other frames or pages were dropped.

    The header's size is checked first (so a bomb never gets decoded). Full-size pixels exist
    only in here, within the process-wide DECODING budget, and are turned upright in place and
    converted only when needed: no extra copy of a large picture.
    """
    with _unreadable_as_image_error(name, limits):
        opened = Image.open(path, formats=ALLOWED_FORMATS)
    with opened:
        size = opened.size
        _check_dimensions(size, name, limits)
        with _unreadable_as_image_error(name, limits):
            notice = _frames_notice(opened, name)
            opened.seek(0)
            _draft(opened, limits.max_side)
        with DECODING.reserve(opened.width * opened.height):
            with _unreadable_as_image_error(name, limits):
                opened.load()  # decode now: truncated data fails here, not inside the model
                if opened.getexif().get(ExifTags.Base.Orientation) in QUARTER_TURNS:
                    size = size[::-1]
                ImageOps.exif_transpose(opened, in_place=True)
            return _fit_within(_to_rgb(opened), limits.max_side), size, notice


def _draft(opened: Image.Image, max_side: int) -> None:
    """Let a large JPEG decode at 1/2, 1/4 or 1/8 scale: libjpeg scales while decoding, far
    cheaper in time and memory than decoding every pixel. Pillow picks the largest scale that
    keeps both sides at least the size asked for, so the long side stays at least `max_side`
    and the LANCZOS downscale after it still has every pixel it needs."""
    if opened.format in ("JPEG", "MPO") and max(opened.size) > max_side:
        opened.draft(None, _fitted_size(opened.size, max_side))


@contextmanager
def _unreadable_as_image_error(name: str, limits: ImageLimits) -> Iterator[None]:
    """Turn Pillow's many ways of failing on bad bytes into one human message each."""
    try:
        yield
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageError(f"{name} has too many pixels to open ({_pixel_limit(limits)}).") from exc
    except UnidentifiedImageError as exc:
        raise ImageError(f"{name} is not an image this demo can read "
                         f"(use PNG, JPEG, WebP, GIF, BMP or TIFF).") from exc
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        logger.info("refused %s: %s: %s", name, type(exc).__name__, exc)
        raise ImageError(f"{name} looks damaged or truncated and cannot be read.") from exc


def _check_dimensions(size: tuple[int, int], name: str, limits: ImageLimits) -> None:
    """Refuse from the header alone: a few KB of zeros can claim billions of pixels."""
    width, height = size
    if width < limits.min_side or height < limits.min_side:
        raise ImageError(f"{name} is {_size(size)} pixels, too small to show anything.")
    if width * height > limits.max_pixels:
        raise ImageError(f"{name} is {_size(size)} pixels, too many to open ({_pixel_limit(limits)}).")


def _frames_notice(opened: Image.Image, name: str) -> str | None:
    """Only the first frame is used; say so, except for MPO (a phone photo plus previews or depth
    maps, nothing the user chose)."""
    if not getattr(opened, "is_animated", False) or opened.format == "MPO":
        return None
    if opened.format == "TIFF":
        return f"{name} has several pages: using the first."
    return f"{name} is animated: using its first frame."


def _to_rgb(image: Image.Image) -> Image.Image:
    """Any mode to 8-bit RGB. Transparency is flattened onto white (a black background, Pillow's
    default, would hide dark text and line art). No step copies a picture it does not need to:
    at full size each copy is up to 160 MB."""
    if image.mode in DEEP_MODES:
        image = _deep_to_8bit(image)
    if image.has_transparency_data:  # alpha band, or a palette/colour key marked transparent
        rgba = image if image.mode == "RGBA" else image.convert("RGBA")
        flattened = Image.new("RGB", rgba.size, (255, 255, 255))
        flattened.paste(rgba, mask=rgba)  # the alpha band blends each pixel onto the white
        return flattened
    return image if image.mode == "RGB" else image.convert("RGB")


def _deep_to_8bit(image: Image.Image) -> Image.Image:
    """16/32-bit and float images to 8-bit grey, scaled by their maximum.

    Pillow's own conversion clips at 255, which turns most 16-bit scans white. Zero stays black
    (so a dark picture stays dark), and the top is the image's maximum, but at least 255 for
    integers and 1.0 for floats (so an image already in that range is not stretched). A 12-bit
    sensor stored in 16 bits therefore still uses the full 8-bit range.
    """
    values = np.asarray(image, dtype=np.float32)
    finite = values[np.isfinite(values)]
    low = min(float(finite.min()), 0.0) if finite.size else 0.0
    high = max(float(finite.max()) if finite.size else 0.0, 1.0 if image.mode == "F" else 255.0)
    scaled = (np.nan_to_num(values, nan=low, posinf=high, neginf=low) - low) * (255.0 / (high - low))
    return Image.fromarray(np.clip(scaled, 0, 255).round().astype(np.uint8))  # 2-D uint8: mode L


def _fit_within(image: Image.Image, max_side: int) -> Image.Image:
    """Downscale, keeping the aspect ratio, so the longer side is at most `max_side`. The model
    would resize anyway, at a higher cost."""
    size = _fitted_size(image.size, max_side)
    return image if size == image.size else image.resize(size, Image.Resampling.LANCZOS)


def _fitted_size(size: tuple[int, int], max_side: int) -> tuple[int, int]:
    """`size` scaled down, keeping the aspect ratio, so the longer side is at most `max_side`."""
    if max(size) <= max_side:
        return size
    scale = max_side / max(size)
    return max(1, round(size[0] * scale)), max(1, round(size[1] * scale))


def _pad_to_usable(image: Image.Image) -> tuple[Image.Image, tuple[int, int] | None]:
    """Centre very small or thin images on a white canvas so the short side is at least
    MIN_SHORT_SIDE and the aspect ratio at most MAX_ASPECT_RATIO; also returns the original size
    when it changed. Padding (not stretching) keeps the content's proportions."""
    need = max(MIN_SHORT_SIDE, math.ceil(max(image.size) / MAX_ASPECT_RATIO))
    width, height = max(image.width, need), max(image.height, need)
    if (width, height) == image.size:
        return image, None
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    canvas.paste(image, ((width - image.width) // 2, (height - image.height) // 2))
    return canvas, image.size


def _digest(image: Image.Image) -> str:
    """Identify the picture, not the file: the engine caches vision features by this."""
    hasher = hashlib.sha256(f"{image.mode}:{image.width}x{image.height}:".encode())
    hasher.update(image.tobytes())
    return hasher.hexdigest()


def _size(size: tuple[int, int]) -> str:
    return f"{size[0]}x{size[1]}"


def _megabytes(count: int) -> str:
    return f"{count / 2**20:.3g}"


def _pixel_limit(limits: ImageLimits) -> str:
    return f"the limit is {limits.max_pixels / 1e6:.3g} megapixels"
