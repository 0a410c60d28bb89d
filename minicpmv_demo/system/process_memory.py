"""Giving freed memory back to the operating system after a burst of large pictures.

glibc serves a large allocation with its own mmap, unmapped as soon as it is freed, but only
above a threshold that it raises to the size of each such block freed (up to 32 MB). Once the
first decoded picture is freed, the next pictures' pixels (Pillow allocates them in blocks of up
to 16 MB) come from malloc's arenas instead, one per busy thread, and freed arena memory mostly
stays with the process: a burst of 16 users sending large pictures left the server gigabytes
bigger for good. Two calls fix that, and `benchmarks/picture_memory.py` needed both: a fixed
threshold keeps large buffers mmapped, so freeing one returns it at once; trimming returns what
the many smaller blocks of a decode (decoder state, resampling rows) left free in the arenas.
Without glibc (macOS, musl) neither exists and both do nothing.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import sys

logger = logging.getLogger(__name__)

M_MMAP_THRESHOLD = -3  # glibc's malloc.h
# Every picture's pixel buffer and large tensors are mmapped; smaller blocks stay in the arenas,
# where they are fast. glibc itself starts at 128 KB, so this adds no mmaps, it only stops the
# threshold from climbing.
MMAP_THRESHOLD_BYTES = 2**20


def return_large_blocks_on_free() -> bool:
    """Have glibc mmap every block from MMAP_THRESHOLD_BYTES up, from now on, in the whole
    process; True when it was set. Call it at start-up, before large pictures come in."""
    libc = _glibc()
    if libc is None:
        return False
    done = bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES))
    if not done:
        logger.warning("mallopt(M_MMAP_THRESHOLD) failed: freed pictures may stay in memory")
    return done


def trim() -> None:
    """Return the free pages in malloc's arenas to the system (well under a millisecond when
    large blocks are mmapped, so the arenas hold only small ones)."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    """The C library when it is glibc (the only one with these calls), else None."""
    if not sys.platform.startswith("linux"):
        return None
    libc = ctypes.CDLL(None)
    return libc if hasattr(libc, "gnu_get_libc_version") else None
