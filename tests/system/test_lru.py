"""The least-recently-used cache, bounded by entries or by bytes, and the byte measure it uses."""

from __future__ import annotations

import torch
from PIL import Image
from transformers.modeling_outputs import BaseModelOutputWithPooling

from minicpmv_demo.system.byte_size import byte_size
from minicpmv_demo.system.lru import LruCache


def test_without_a_size_the_capacity_counts_entries():
    cache: LruCache[str] = LruCache(2)
    cache.put("a", "x" * 1000)
    cache.put("b", "y")
    assert cache.get("a") is not None  # "a" is now the most recently used
    cache.put("c", "z")
    assert (cache.get("a"), cache.get("b"), cache.get("c")) == ("x" * 1000, None, "z")
    assert cache.total == 2 and cache.hits == 3
    nothing: LruCache[str] = LruCache(0)
    nothing.put("a", "x")
    assert nothing.get("a") is None


def test_with_a_size_the_capacity_counts_bytes_and_the_oldest_leave_first():
    cache: LruCache[bytes] = LruCache(100, size=len)
    cache.put("a", b"a" * 40)
    cache.put("b", b"b" * 40)
    cache.get("a")
    cache.put("c", b"c" * 40)  # 120 bytes: "b", the least recently used, leaves
    assert cache.get("b") is None and cache.get("a") and cache.get("c")
    assert cache.total == 80
    cache.put("a", b"a" * 10)  # replacing an entry counts its new size only
    assert cache.total == 50
    cache.put("d", b"d" * 95)  # pushes out both others
    assert cache.total == 95 and cache.get("a") is None and cache.get("c") is None


def test_an_entry_larger_than_the_whole_capacity_is_not_kept():
    cache: LruCache[bytes] = LruCache(100, size=len)
    cache.put("small", b"s" * 10)
    cache.put("huge", b"h" * 101)
    assert cache.get("huge") is None and cache.get("small") == b"s" * 10 and cache.total == 10


def test_byte_size_of_pictures_tensors_and_model_outputs():
    assert byte_size(Image.new("RGB", (100, 10))) == 4000  # Pillow keeps RGB in 4 bytes a pixel
    assert byte_size(Image.new("L", (100, 10))) == 1000
    assert byte_size(Image.new("I;16", (100, 10))) == 2000
    pixels, sizes = torch.zeros(3, 14, 448, dtype=torch.float32), torch.zeros(2, 2, dtype=torch.int32)
    assert byte_size((pixels, sizes, "<image>")) == 3 * 14 * 448 * 4 + 16 + 7
    pooled = torch.zeros(5, 64, 32)
    features = BaseModelOutputWithPooling(last_hidden_state=torch.zeros(1, 10, 8),
                                          pooler_output=list(pooled.unbind()))  # views of one storage
    assert byte_size(features) == 10 * 8 * 4 + 5 * 64 * 32 * 4
    assert byte_size([pooled[0], pooled[1]]) == pooled.nbytes  # a view keeps its whole storage alive
