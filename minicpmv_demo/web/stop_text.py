"""OpenAI's `stop`: a reply ends before the first stop string, which the client never sees.

The cut is made on the reply's text as it streams, so it works the same for the local engine
and a backend. While the text ends with the start of a stop string ("Ob" of "Observation:"),
that end is held back: sent later if the stop string does not follow, never if it does.
"""

from __future__ import annotations


class StopText:
    """What of a reply a client may see, given its stop strings."""

    def __init__(self, stops: tuple[str, ...]) -> None:
        self.stops = stops
        self.stopped = False  # a stop string was found: the reply ends there
        self._cut: int | None = None
        self._searched = 0  # the text before this was searched, and held no stop string

    def visible(self, text: str, ended: bool = False) -> str:
        """The part of `text` (the reply so far) to send; all of it once `ended` unless cut."""
        if not self.stops:
            return text
        if self._cut is None:
            self._find(text)
        if self._cut is not None:
            return text[:self._cut]
        return text if ended else text[:len(text) - self._held(text)]

    def _find(self, text: str) -> None:
        longest = max(map(len, self.stops))
        start = max(0, self._searched - longest + 1)  # a stop string may straddle the last search
        found = [index for index in (text.find(stop, start) for stop in self.stops) if index >= 0]
        if found:
            self._cut, self.stopped = min(found), True
        self._searched = len(text)

    def _held(self, text: str) -> int:
        """Length of the longest end of `text` that is the start of a stop string."""
        held = 0
        for stop in self.stops:
            first = stop[0]
            position = text.find(first, max(0, len(text) - len(stop) + 1))
            while position >= 0:
                if stop.startswith(text[position:]):
                    held = max(held, len(text) - position)
                    break  # the earliest candidate is this stop's longest
                position = text.find(first, position + 1)
        return held
