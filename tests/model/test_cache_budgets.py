"""The picture caches are bounded by bytes: a burst of large, distinct pictures fills each one
up to its budget and no further (an entry count bounds nothing when entries differ 1000-fold)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from minicpmv_demo.intake import message
from minicpmv_demo.system.byte_size import byte_size
from minicpmv_demo.intake.conversation import Conversation, PromptOptions, Turn
from minicpmv_demo.intake.images import ImageLimits, prepare_image
from minicpmv_demo.model.minicpmv4 import runner as native


def picture(path: Path, side: int, index: int) -> Path:
    """A distinct side x side picture: a smooth pattern (quick to save) with its number stamped in."""
    y, x = np.ogrid[:side, :side]
    pixels = np.stack(np.broadcast_arrays(x % 256, y % 256, (x + y) % 256), axis=-1).astype(np.uint8)
    pixels[:16, :16] = index
    Image.fromarray(pixels).save(path, compress_level=1)
    return path


def test_checked_pictures_are_bounded_by_bytes(tmp_path):
    rules = message.InputRules(image_limits=ImageLimits(), max_images=4, allowed_roots=(str(tmp_path),))
    cache = message._prepared
    full_size = 1344 * 1344 * 4  # one full-size picture as Pillow keeps it
    for index in range(cache.capacity // full_size + 2):
        path = picture(tmp_path / f"photo-{index}.png", 1344, index)
        message.build_conversation({"text": "?", "files": [str(path)]}, [], system_prompt="", rules=rules)
    assert cache.capacity == 32 * 2**20
    assert cache.capacity - full_size < cache.total <= cache.capacity


def test_preprocessed_pictures_and_vision_features_are_bounded_by_bytes(loaded_tiny, monkeypatch, tmp_path):
    monkeypatch.setattr(native, "IMAGE_CACHE_BYTES", 2 * 2**20)
    monkeypatch.setattr(native, "VISION_CACHE_BYTES", 16 * 2**10)
    runner = native.MiniCPMV4Runner(loaded_tiny.runner.model, loaded_tiny.runner.processor)
    sizes = []
    for index in range(8):
        image = prepare_image(picture(tmp_path / f"photo-{index}.png", 448, index))
        prompt = runner.encode(Conversation(turns=(Turn(role="user", text="?", images=(image,)),)))
        with torch.inference_mode():  # as in prefill
            features = runner._visual_features(prompt, "image")
        sizes.append((byte_size(runner._preprocessed(image, PromptOptions())), byte_size(features)))
    pixels, vision = (sum(column) for column in zip(*sizes, strict=True))
    assert pixels > native.IMAGE_CACHE_BYTES and vision > native.VISION_CACHE_BYTES, sizes  # more than fits
    assert 0 < runner._image_cache.total <= native.IMAGE_CACHE_BYTES
    assert 0 < runner._vision_cache.total <= native.VISION_CACHE_BYTES
