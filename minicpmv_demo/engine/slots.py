"""Which slot each running row occupies: rows stay packed in slots 0..n-1.

The runner keeps each running row's cache in a preallocated slot (model/slot_cache.py) and a
decode step reads the first n slots as plain views. When rows leave, the engine picks the new
row order here; the runner then moves rows so that row i sits in slot i again. Filling each
hole with a row from the end moves as few rows as there are holes below n (a leave at the front
of 64 rows moves one row, not 63), and no row ever moves up, so every move lands in a slot
already freed.
"""

from __future__ import annotations


def fill_holes(alive: list[int]) -> list[int]:
    """The new row order after a leave: rows stay put, and each hole takes a row from the end.

    `alive` are the indices of the rows that stay, ascending; returns them reordered so that
    `order[p] >= p` for every p.
    """
    size, alive_set = len(alive), set(alive)
    tail = [index for index in alive if index >= size]
    return [index if index in alive_set else tail.pop() for index in range(size)]
