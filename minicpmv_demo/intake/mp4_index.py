"""How many index entries an MP4 or MOV file would make FFmpeg build, read from its boxes first.

FFmpeg's MP4 reader builds its whole sample index inside `av.open`, before any caller can look
at the file: about 40 bytes of memory for every sample the header *claims*. One 8-byte `stts`
entry and a `stsz` with a constant sample size claim 85 million frames in a 6.6 KB file, which
costs 3 GB; a `trun` without per-sample fields does the same in a fragment. Nothing in those
claims has to be backed by data in the file, so they are counted here from the file's bytes
(memory-mapped, nothing is decoded) and compared with what a real clip can hold before FFmpeg
sees it.

Counted per track, as FFmpeg sizes its tables: the sample count of `stsz`/`stz2`, the samples
that `stts`, `ctts` and `sbgp` run over (the largest of them), and the samples of every `trun`.
Uncompressed audio that FFmpeg indexes by chunk (an audio track whose `stts` is one run of
duration 1) is counted by chunk the same way, so long PCM tracks are not mistaken for bombs.
A table that claims more entries than its box holds is refused as damaged: no muxer writes one.
"""

from __future__ import annotations

import mmap
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

# Boxes whose payload is a list of boxes, on the paths to the sample tables and fragment runs.
CONTAINERS = frozenset({b"moov", b"trak", b"mdia", b"minf", b"stbl", b"moof", b"traf"})
# FFmpeg's chunk-indexed audio makes one entry per 1024 samples, or per frame of at least 160
# samples (GSM-like codecs); counting one per 160 samples never undercounts it.
CHUNK_AUDIO_SAMPLES_PER_ENTRY = 160
# trun flags that add a 4-byte field per sample.
TRUN_PER_SAMPLE_FLAGS = (0x100, 0x200, 0x400, 0x800)


class Mp4StructureError(ValueError):
    """The boxes do not add up (a table longer than its box, a box past its parent)."""


@dataclass(frozen=True)
class _Box:
    kind: bytes
    start: int  # first payload byte
    end: int  # one past the last payload byte


def index_entries(path: str | os.PathLike) -> int:
    """Index entries FFmpeg would allocate for `path` (an MP4 or MOV file), all tracks together.

    Raises Mp4StructureError for boxes that do not add up.
    """
    with open(path, "rb") as file, mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as data:
        total = 0
        for box in _boxes(data, 0, len(data)):
            if box.kind == b"moov":
                total += sum(_track_entries(data, trak) for trak in _children(data, box, b"trak"))
            elif box.kind == b"moof":
                total += _fragment_entries(data, box)
        return total


def _boxes(data: mmap.mmap, start: int, end: int) -> Iterator[_Box]:
    """The boxes laid end to end in data[start:end]; a last box cut short by the end of the file
    is read as far as it goes, as FFmpeg reads it."""
    position = start
    while position + 8 <= end:
        size, kind = struct.unpack_from(">I4s", data, position)
        header = 8
        if size == 1:
            if position + 16 > end:
                raise Mp4StructureError(f"the {kind!r} box's size is cut off")
            size, header = struct.unpack_from(">Q", data, position + 8)[0], 16
        elif size == 0:
            size = end - position
        if size < header:
            raise Mp4StructureError(f"the {kind!r} box is smaller than its header")
        if kind == b"cmov":  # a zlib-compressed header: its tables cannot be counted unpacked
            raise Mp4StructureError("the movie header is compressed")
        yield _Box(kind, position + header, min(position + size, end))
        position += size


def _children(data: mmap.mmap, box: _Box, kind: bytes) -> Iterator[_Box]:
    return (child for child in _boxes(data, box.start, box.end) if child.kind == kind)


def _descendants(data: mmap.mmap, box: _Box) -> Iterator[_Box]:
    """Every box under `box` on the container paths (moov/trak/mdia/minf/stbl, moof/traf)."""
    for child in _boxes(data, box.start, box.end):
        yield child
        if child.kind in CONTAINERS:
            yield from _descendants(data, child)


def _table(data: mmap.mmap, box: _Box, header: int, columns: int, count: int | None = None) -> np.ndarray:
    """A full box's table of big-endian 32-bit rows (`columns` wide) after `header` bytes;
    `count` defaults to the 32-bit entry count just before the table."""
    if count is None:
        count = _u32(data, box, header - 4)
    width = 4 * columns
    if box.start + header + count * width > box.end:
        raise Mp4StructureError(f"the {box.kind.decode(errors='replace')} table claims {count:,} entries "
                                "but its box is shorter")
    first = box.start + header
    # Copied out of the map: a view would keep the map open (and unclosable) while an error unwinds.
    return np.frombuffer(data[first:first + count * width], dtype=">u4").reshape(count, columns)


def _u32(data: mmap.mmap, box: _Box, offset: int) -> int:
    if box.start + offset + 4 > box.end:
        raise Mp4StructureError(f"the {box.kind.decode(errors='replace')} box is cut short")
    return struct.unpack_from(">I", data, box.start + offset)[0]


def _track_entries(data: mmap.mmap, trak: _Box) -> int:
    """What one track's sample tables make FFmpeg allocate (see the module's docstring)."""
    boxes: dict[bytes, _Box] = {}
    groups = 0
    for box in _descendants(data, trak):
        if box.kind == b"sbgp":  # several may exist (one per grouping type): each is unrolled
            groups = max(groups, _sample_group_samples(data, box))
        boxes.setdefault(box.kind, box)  # the first of each, as FFmpeg reads it
    samples = _sample_count(data, boxes)
    stts = _table(data, boxes[b"stts"], 8, 2) if b"stts" in boxes else np.zeros((0, 2), np.uint32)
    ctts = _table(data, boxes[b"ctts"], 8, 2) if b"ctts" in boxes else np.zeros((0, 2), np.uint32)
    handler = _handler(data, boxes.get(b"hdlr"))
    if handler == b"soun" and len(stts) == 1 and int(stts[0, 1]) == 1:
        return max(_chunk_audio_entries(data, boxes), _sum(ctts[:, 0]), groups)
    return max(samples, _sum(stts[:, 0]), _sum(ctts[:, 0]), groups)


def _sample_count(data: mmap.mmap, boxes: dict[bytes, _Box]) -> int:
    """stsz's or stz2's sample count: with a constant size it is a bare claim, with no table."""
    if b"stsz" in boxes:
        box = boxes[b"stsz"]
        size, count = _u32(data, box, 4), _u32(data, box, 8)
        if size == 0:
            _table(data, box, 12, 1, count)
        return count
    if b"stz2" in boxes:
        box = boxes[b"stz2"]
        field_bits, count = _u32(data, box, 4) & 0xFF, _u32(data, box, 8)
        if box.start + 12 + (count * field_bits + 7) // 8 > box.end:
            raise Mp4StructureError(f"the stz2 table claims {count:,} entries but its box is shorter")
        return count
    return 0


def _chunk_audio_entries(data: mmap.mmap, boxes: dict[bytes, _Box]) -> int:
    """Entries of audio that FFmpeg indexes by chunk: each stsc run's chunks times the pieces
    its chunks' samples are cut into (one per CHUNK_AUDIO_SAMPLES_PER_ENTRY at most)."""
    offsets = boxes.get(b"stco") or boxes.get(b"co64")
    if offsets is None or b"stsc" not in boxes:
        return 0
    chunks = _u32(data, offsets, 4)
    _table(data, offsets, 8, 2 if offsets.kind == b"co64" else 1, chunks)
    runs = _table(data, boxes[b"stsc"], 8, 3).astype(np.int64)
    if not len(runs):
        return 0
    firsts = runs[:, 0]
    run_chunks = np.clip(np.append(firsts[1:], chunks + 1) - firsts, 0, None)
    pieces = -(-runs[:, 1] // CHUNK_AUDIO_SAMPLES_PER_ENTRY)  # ceiling division
    return _sum(run_chunks * pieces)


def _sample_group_samples(data: mmap.mmap, box: _Box) -> int:
    """Samples one sbgp box's runs cover (FFmpeg unrolls them for HEVC's open-GOP points)."""
    version = _u32(data, box, 0) >> 24
    header = 8 + (4 if version == 1 else 0)  # grouping type, then a parameter in version 1
    return _sum(_table(data, box, header + 4, 2)[:, 0])


def _fragment_entries(data: mmap.mmap, moof: _Box) -> int:
    """Samples of a fragment's runs: a trun without per-sample fields claims them for free."""
    total = 0
    for box in _descendants(data, moof):
        if box.kind != b"trun":
            continue
        flags, count = _u32(data, box, 0) & 0xFFFFFF, _u32(data, box, 4)
        fixed = 8 + 4 * bool(flags & 0x1) + 4 * bool(flags & 0x4)  # data offset, first sample's flags
        per_sample = 4 * sum(bool(flags & bit) for bit in TRUN_PER_SAMPLE_FLAGS)
        if box.start + fixed + count * per_sample > box.end:
            raise Mp4StructureError(f"the trun table claims {count:,} samples but its box is shorter")
        total += count
    return total


def _handler(data: mmap.mmap, hdlr: _Box | None) -> bytes:
    """The track's handler type ('vide', 'soun', ...): MP4's and QuickTime's hdlr keep it at
    the same place (after version, flags and a pre-defined or component-type field)."""
    if hdlr is None or hdlr.start + 12 > hdlr.end:
        return b""
    return bytes(data[hdlr.start + 8:hdlr.start + 12])


def _sum(values: np.ndarray) -> int:
    return int(values.astype(np.uint64).sum()) if len(values) else 0
