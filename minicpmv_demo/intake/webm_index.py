"""How many cue points a WebM (Matroska) file would make FFmpeg read, counted from its bytes first.

FFmpeg's Matroska reader parses the whole `Cues` index inside `av.open`: about 110 bytes of
memory per cue point, so a 20 MB upload made only of cue points costs 160 MB before any check
can run. Real files have one cue point per key frame or cluster (about one a second). The count
here follows where FFmpeg finds them: level-1 elements before the first Cluster, and what the
SeekHeads point to (a SeekHead may point to another). Counting stops at `limit`: a hostile file
costs this walk no more than a real one.
"""

from __future__ import annotations

import mmap
import os
from dataclasses import dataclass

SEGMENT = 0x18538067
EBML_HEADER = 0x1A45DFA3
CLUSTER = 0x1F43B675
SEEK_HEAD = 0x114D9B74
SEEK = 0x4DBB
SEEK_ID = 0x53AB
SEEK_POSITION = 0x53AC
CUES = 0x1C53BB6B
CUE_POINT = 0xBB
CUE_TRACK_POSITIONS = 0xB7
# FFmpeg tracks a bounded number of level-1 elements; a chain of SeekHeads longer than this is
# not followed by it either.
MAX_SEEK_HEADS = 64


class WebmStructureError(ValueError):
    """The elements do not add up (a size past the end, a malformed number)."""


@dataclass(frozen=True)
class _Element:
    id: int
    start: int  # first payload byte
    end: int  # one past the last payload byte (the parent's end when the size is unknown)
    sized: bool


def cue_entries(path: str | os.PathLike, limit: int) -> int:
    """Cue points and their track positions FFmpeg would index in `path`; counting stops once
    past `limit`. Raises WebmStructureError for elements that do not add up."""
    with open(path, "rb") as file, mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as data:
        segment = _segment(data)
        if segment is None:
            return 0
        cues: set[_Element] = set()
        heads: list[_Element] = []
        for element in _children(data, segment):
            if element.id == CLUSTER or not element.sized:
                break
            if element.id == CUES:
                cues.add(element)
            elif element.id == SEEK_HEAD:
                heads.append(element)
        followed: set[_Element] = set()
        while heads and len(followed) < MAX_SEEK_HEADS:
            head = heads.pop()
            if head in followed:
                continue
            followed.add(head)
            for kind, position in _seek_entries(data, head):
                target = _target(data, segment.start + position, segment.end)
                if target is not None and target.id == kind == CUES:
                    cues.add(target)
                elif target is not None and target.id == kind == SEEK_HEAD:
                    heads.append(target)
        total = 0
        for element in cues:
            total += _count_cues(data, element, limit - total)
            if total > limit:
                break
        return total


def _segment(data: mmap.mmap) -> _Element | None:
    position = 0
    while position < len(data):
        element = _read(data, position, len(data))
        if element.id == SEGMENT:
            return element
        if not element.sized:
            return None
        position = element.end
    return None


def _children(data: mmap.mmap, parent: _Element):
    position = parent.start
    while position < parent.end:
        element = _read(data, position, parent.end)
        yield element
        if not element.sized:
            return
        position = element.end


def _seek_entries(data: mmap.mmap, head: _Element):
    """(element id, position in the segment) of each Seek entry of a SeekHead."""
    for seek in _children(data, head):
        if seek.id != SEEK:
            continue
        kind = position = None
        for field in _children(data, seek):
            if field.id == SEEK_ID:
                kind = int.from_bytes(data[field.start:field.end], "big")
            elif field.id == SEEK_POSITION:
                position = int.from_bytes(data[field.start:field.end], "big")
        if kind is not None and position is not None:
            yield kind, position


def _target(data: mmap.mmap, position: int, end: int) -> _Element | None:
    """The element a Seek entry points to, or None when it points outside the segment."""
    if not 0 <= position < end:
        return None
    try:
        return _read(data, position, end)
    except WebmStructureError:
        return None  # FFmpeg skips a seek entry it cannot read


def _count_cues(data: mmap.mmap, cues: _Element, budget: int) -> int:
    """Cue points plus their track positions (each is an index entry), stopping past `budget`.
    The hot loop of a hostile file, hence plain tuples instead of elements."""
    total = 0
    position = cues.start
    while position < cues.end and total <= budget:
        point_id, inner, size = _header(data, position, cues.end)
        if size < 0:
            break
        position = inner + size
        if point_id != CUE_POINT:
            continue
        total += 1
        while inner < position:
            field_id, field_start, field_size = _header(data, inner, position)
            total += field_id == CUE_TRACK_POSITIONS
            if field_size < 0:
                break
            inner = field_start + field_size
    return total


def _read(data: mmap.mmap, position: int, end: int) -> _Element:
    """The element whose header starts at `position`, within a parent ending at `end`."""
    element_id, start, size = _header(data, position, end)
    if size < 0:
        return _Element(element_id, start, end, False)
    return _Element(element_id, start, start + size, True)


def _header(data: mmap.mmap, position: int, end: int) -> tuple[int, int, int]:
    """(id, payload start, payload size or -1 when unknown) of the element at `position`."""
    element_id, after_id = _vint(data, position, end)
    size, start = _vint(data, after_id, end)
    width = start - after_id
    size &= (1 << (7 * width)) - 1  # the size without its length marker
    if size == (1 << (7 * width)) - 1:
        return element_id, start, -1
    if start + size > end:
        raise WebmStructureError(f"element {element_id:#x} runs past its parent")
    return element_id, start, size


def _vint(data: mmap.mmap, position: int, end: int) -> tuple[int, int]:
    """An EBML variable-length number at `position` (length marker kept): value, next position."""
    if position >= end:
        raise WebmStructureError("an element is cut off")
    width = 9 - data[position].bit_length()
    if width > 8 or position + width > end:
        raise WebmStructureError("an element is cut off or has a number longer than 8 bytes")
    return int.from_bytes(data[position:position + width], "big"), position + width
