"""How MiniCPM-V 2.5 / 2.6 cut a picture into slices and turn each slice into pixels.

A picture is read twice: once whole, shrunk (or grown) to about `scale_resolution` pixels square,
and, when it is larger than that, once more cut into a grid of up to `max_slice_nums` slices of
about that size each, the grid chosen to follow the picture's aspect ratio. Every side is a
multiple of `patch_size`. This matches `image_processing_minicpmv.py` of the 2.5 release
(`find_best_resize`, `get_refine_size`, `get_sliced_grid`, `slice_image`, `reshape_by_patch`, the
normalisation in `preprocess`) rule for rule, including Python's round-half-to-even, which
candidate grid wins a tie (the first found), and PIL's bicubic resize.

Only the picture's size decides the grid, so placeholders can be counted without pixels.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from .config import SliceSettings

# The release normalises to [-1, 1]: (x / 255 - 0.5) / 0.5.
NORM_MEAN = (0.5, 0.5, 0.5)
NORM_STD = (0.5, 0.5, 0.5)

Size = tuple[int, int]  # (width, height), as PIL gives it
Grid = tuple[int, int]  # (columns, rows)


@dataclass(frozen=True)
class SlicedPicture:
    """One picture ready for the vision tower: the whole picture first, then the grid's slices row by row."""

    pixel_values: list[torch.Tensor]  # per slice: float32 [3, patch, patches * patch], patches in row-major order
    tgt_sizes: torch.Tensor  # [slices, 2] int32: (rows, columns) of patches per slice
    grid: Grid | None  # None: the picture is read whole only

    @property
    def slice_count(self) -> int:
        return len(self.pixel_values)


def _multiple_of(length: float, unit: int) -> int:
    """`length` rounded to a multiple of `unit` (half to even, as Python rounds), at least `unit`."""
    return max(round(length / unit) * unit, unit)


def best_resize(size: tuple[float, float], scale_resolution: int, patch_size: int,
                allow_upscale: bool = False) -> Size:
    """The size a picture (or one grid cell) is resized to: about `scale_resolution` squared in
    area if larger (or always, with `allow_upscale`), aspect kept, sides multiples of the patch."""
    width, height = size
    if width * height > scale_resolution * scale_resolution or allow_upscale:
        aspect = width / height
        height = int(scale_resolution / math.sqrt(aspect))
        width = int(height * aspect)
    return _multiple_of(width, patch_size), _multiple_of(height, patch_size)


def refine_size(size: Size, grid: Grid, scale_resolution: int, patch_size: int) -> Size:
    """The size the picture is resized to before it is cut into `grid`: each cell sized like
    `best_resize` (upscaled if small), so the cells tile it exactly."""
    width, height = size
    columns, rows = grid
    cell_width = _multiple_of(width, columns) / columns
    cell_height = _multiple_of(height, rows) / rows
    best_width, best_height = best_resize((cell_width, cell_height), scale_resolution, patch_size, allow_upscale=True)
    return best_width * columns, best_height * rows


def slice_grid(size: Size, settings: SliceSettings) -> Grid | None:
    """The (columns, rows) grid a picture of `size` is cut into, or None when it is read whole.

    The slice count is the picture's area in `scale_resolution` squares, rounded up and capped at
    `max_slice_nums`; counts one below and one above are tried too (never 1, never over the cap),
    and the grid whose aspect ratio is closest in log scale wins, the first found on a tie.
    """
    width, height = size
    log_aspect = math.log(width / height)
    area = width * height / (settings.scale_resolution * settings.scale_resolution)
    count = min(math.ceil(area), settings.max_slice_nums)
    if count <= 1:
        return None
    best, best_error = (1, 1), float("inf")
    for total in (count - 1, count, count + 1):
        if total == 1 or total > settings.max_slice_nums:
            continue
        for columns in range(1, total + 1):
            if total % columns:
                continue
            error = abs(log_aspect - math.log(columns / (total // columns)))
            if error < best_error:
                best, best_error = (columns, total // columns), error
    return best


def slice_picture(image: Image.Image, settings: SliceSettings) -> SlicedPicture:
    """Cut `image` into the whole picture plus its grid's slices, as pixels for the vision tower."""
    image = image.convert("RGB")
    grid = slice_grid(image.size, settings)
    scale, patch = settings.scale_resolution, settings.patch_size
    if grid is None:
        whole = best_resize(image.size, scale, patch, allow_upscale=True)
        pieces = [image.resize(whole, resample=Image.Resampling.BICUBIC)]
    else:
        pieces = [image.resize(best_resize(image.size, scale, patch), resample=Image.Resampling.BICUBIC)]
        refined = image.resize(refine_size(image.size, grid, scale, patch), resample=Image.Resampling.BICUBIC)
        pieces += _cut(refined, grid)
    pixels = [_to_patch_rows(piece, patch) for piece in pieces]
    sizes = torch.tensor([[piece.height // patch, piece.width // patch] for piece in pieces], dtype=torch.int32)
    return SlicedPicture(pixel_values=pixels, tgt_sizes=sizes, grid=grid)


def _cut(image: Image.Image, grid: Grid) -> list[Image.Image]:
    """The grid's cells, row by row (left to right within a row)."""
    columns, rows = grid
    cell_width, cell_height = image.width // columns, image.height // rows
    return [image.crop((left, top, left + cell_width, top + cell_height))
            for top in range(0, image.height, cell_height) for left in range(0, image.width, cell_width)]


def _to_patch_rows(piece: Image.Image, patch: int) -> torch.Tensor:
    """Normalised pixels of one slice as [3, patch, patches * patch]: patch n (row-major over the
    slice's patch grid) occupies columns n * patch .. n * patch + patch - 1, the layout the 2.5
    release's `reshape_by_patch` gives the vision tower."""
    pixels = np.asarray(piece, dtype=np.uint8).astype(np.float32) / 255
    pixels = (pixels - np.array(NORM_MEAN, dtype=np.float32)) / np.array(NORM_STD, dtype=np.float32)
    channels_first = torch.from_numpy(np.ascontiguousarray(pixels.transpose(2, 0, 1)))
    rows, columns = piece.height // patch, piece.width // patch
    grid = channels_first.reshape(3, rows, patch, columns, patch).permute(0, 2, 1, 3, 4)
    return grid.reshape(3, patch, rows * columns * patch).contiguous()
