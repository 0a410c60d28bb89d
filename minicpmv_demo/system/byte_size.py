"""How many bytes a cached value keeps alive: pictures, tensors, and containers of them.

The caches hold decoded pictures, processor tensors and vision-tower outputs, whose sizes range
from kilobytes to tens of megabytes; bounding them by bytes needs a measure of each.
"""

from __future__ import annotations

from collections.abc import Mapping

from PIL import Image


def byte_size(value: object) -> int:
    """Bytes of pixel and tensor data in `value`; small Python objects around them count as 0.

    Tensors count their whole storage (a view keeps all of it alive), each storage once; a
    transformers `ModelOutput` (such as `BaseModelOutputWithPooling`) is a mapping of its fields.
    """
    return _size(value, set())


def _size(value: object, storages: set[int]) -> int:
    if isinstance(value, Image.Image):
        return _image_bytes(value)
    if hasattr(value, "untyped_storage"):  # a torch tensor, without importing torch here
        storage = value.untyped_storage()
        if storage.data_ptr() in storages:
            return 0
        storages.add(storage.data_ptr())
        return storage.nbytes()
    if isinstance(value, (str, bytes)):
        return len(value)
    if isinstance(value, Mapping):
        return sum(_size(item, storages) for item in value.values())
    if isinstance(value, (list, tuple)):
        return sum(_size(item, storages) for item in value)
    return 0


def _image_bytes(image: Image.Image) -> int:
    """Pillow keeps every multi-band pixel in 4 bytes (RGB too) and 32-bit modes in 4."""
    if len(image.getbands()) > 1 or image.mode in ("I", "F"):
        per_pixel = 4
    elif image.mode.startswith("I;16"):
        per_pixel = 2
    else:
        per_pixel = 1
    return image.width * image.height * per_pixel
