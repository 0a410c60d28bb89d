"""Memory while decoding large pictures: a process-wide pixel budget, JPEGs decoded at reduced
scale, and freed pixel buffers given back to the system."""

from __future__ import annotations

import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import wait_until
from minicpmv_demo.intake import images
from minicpmv_demo.intake.images import prepare_image
from minicpmv_demo.intake.pixel_budget import PixelBudget

ROOT = Path(__file__).resolve().parents[2]


def pattern(width: int, height: int, index: int = 0) -> Image.Image:
    """Smooth colours with some detail (quick to encode, not trivially flat), numbered in a corner."""
    y, x = np.ogrid[:height, :width]
    detail = np.sin(x / 40.0) * np.cos(y / 55.0) * 100 + 128
    pixels = np.stack(np.broadcast_arrays(x * 255 // width, y * 255 // height, detail), axis=-1).astype(np.uint8)
    pixels[:16, :16] = index
    return Image.fromarray(pixels)


@pytest.fixture
def budget(monkeypatch):
    """A fresh decode budget (its counters start at zero), installed as the process-wide one."""
    def install(capacity: int) -> PixelBudget:
        fresh = PixelBudget(capacity)
        monkeypatch.setattr(images, "DECODING", fresh)
        return fresh
    return install


def test_decoding_threads_never_hold_more_pixels_than_the_budget(tmp_path, budget):
    side = 2000
    paths = []
    for index in range(6):
        paths.append(tmp_path / f"big-{index}.png")
        pattern(side, side, index).save(paths[-1], compress_level=1)
    decoding = budget(capacity=int(2.5 * side * side))  # room for two at once, not three
    threads = [threading.Thread(target=prepare_image, args=(path,)) for path in paths]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert decoding.peak == 2 * side * side  # two decoded side by side, never three
    assert decoding.in_use == 0


def test_a_picture_larger_than_the_whole_budget_still_decodes_alone(tmp_path, budget):
    decoding = budget(capacity=1000)
    pattern(300, 200).save(tmp_path / "small.png")
    prepared = prepare_image(tmp_path / "small.png")
    assert prepared.image.size == (300, 200) and decoding.peak == 300 * 200


def test_reservations_are_served_in_arrival_order():
    """A large picture waiting for room is not overtaken by small ones that would fit."""
    budget = PixelBudget(10)
    order: list[str] = []
    first_in, release_first = threading.Event(), threading.Event()

    def decode(name: str, pixels: int, hold: threading.Event | None = None) -> None:
        with budget.reserve(pixels):
            order.append(name)
            if hold:
                first_in.set()
                hold.wait(5)

    holder = threading.Thread(target=decode, args=("holder", 6, release_first))
    holder.start()
    first_in.wait(5)
    large = threading.Thread(target=decode, args=("large", 8))
    large.start()
    assert wait_until(lambda: len(budget._queue) == 1), "the large one waits in line"
    small = threading.Thread(target=decode, args=("small", 2))  # 6 + 2 would fit, but it is second in line
    small.start()
    assert wait_until(lambda: len(budget._queue) == 2), "the small one waits in line too"
    assert order == ["holder"]
    release_first.set()
    for thread in (holder, large, small):
        thread.join(5)
    assert order == ["holder", "large", "small"] and budget.peak <= 10 and budget.in_use == 0


def test_a_huge_jpeg_is_decoded_at_reduced_scale(tmp_path, budget):
    path = tmp_path / "camera.jpg"
    pattern(6000, 4000).save(path, quality=90)
    decoding = budget(capacity=images.DECODING.capacity)
    prepared = prepare_image(path)
    # libjpeg decoded at 1/4 scale: 1500x1000 pixels, still more than 1344 on the long side.
    assert decoding.peak == 1500 * 1000
    assert prepared.image.size == (1344, 896)
    assert prepared.notices == ("camera.jpg was downscaled from 6000x4000 to 1344x896.",)
    with Image.open(path) as full:  # what decoding every pixel and downscaling gives
        reference = full.resize((1344, 896), Image.Resampling.LANCZOS)
    difference = np.abs(np.asarray(reference, dtype=np.float32) - np.asarray(prepared.image, dtype=np.float32))
    assert difference.mean() < 1.0 and difference.max() < 16



def test_a_huge_rotated_jpeg_reports_its_upright_size(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display", as phones write it
    path = tmp_path / "phone.jpg"
    pattern(6000, 4000).save(path, exif=exif, quality=90)
    prepared = prepare_image(path)
    assert prepared.image.size == (896, 1344)
    assert prepared.notices == ("phone.jpg was downscaled from 4000x6000 to 896x1344.",)


# Eight threads each make a 16 MB picture four times over: with glibc's sliding mmap
# threshold the later ones come from per-thread arenas, which keep the memory (about +130 MB).
RELEASE_PROBE = """
import threading, psutil
from PIL import Image
from minicpmv_demo.system.process_memory import return_large_blocks_on_free
assert return_large_blocks_on_free()
rss = lambda: psutil.Process().memory_info().rss
before = rss()
def pictures():
    for _ in range(4):
        Image.new("RGB", (2000, 2000), (1, 2, 3)).resize((100, 100))
threads = [threading.Thread(target=pictures) for _ in range(8)]
[t.start() for t in threads]
[t.join() for t in threads]
print((rss() - before) / 2**20)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator only")
def test_freed_picture_buffers_go_back_to_the_system():
    """In a fresh process, as at the app's start-up: the setting is process-wide."""
    grown_mb = float(subprocess.run([sys.executable, "-c", RELEASE_PROBE], cwd=ROOT, check=True,
                                    capture_output=True, text=True, timeout=120).stdout)
    assert grown_mb < 40
