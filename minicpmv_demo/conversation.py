"""A chat as the model sees it: turns of text and validated images, plus a system prompt.

This is the hand-over format between the UI side (which parses Gradio's messages and checks
uploads) and the model side (which renders it with a chat template). Neither side needs to know
the other's formats.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Literal

from .images import PreparedImage


@dataclass(frozen=True)
class Turn:
    role: Literal["user", "assistant"]
    text: str
    images: tuple[PreparedImage, ...] = ()


@dataclass(frozen=True)
class Conversation:
    """The whole chat so far; the last turn is the user's question to answer."""

    turns: tuple[Turn, ...]
    system_prompt: str = ""
    _digest: str = field(default="", init=False, repr=False, compare=False)

    def images(self) -> list[PreparedImage]:
        return [image for turn in self.turns for image in turn.images]

    def to_template_messages(self) -> list[dict]:
        """Messages for `processor.apply_chat_template`: images first in a turn, then its text."""
        messages: list[dict] = []
        if self.system_prompt:
            messages.append({"role": "system", "content": [{"type": "text", "text": self.system_prompt}]})
        for turn in self.turns:
            content = [{"type": "image"} for _ in turn.images]
            content.append({"type": "text", "text": turn.text})
            messages.append({"role": turn.role, "content": content})
        return messages

    def digest(self) -> str:
        """Identity of the chat for the reply cache: images by content hash, never by file name."""
        if not self._digest:
            hasher = hashlib.sha256(self.system_prompt.encode())
            for turn in self.turns:
                hasher.update(f"\x00{turn.role}\x00{turn.text}".encode())
                for image in turn.images:
                    hasher.update(image.digest.encode())
            object.__setattr__(self, "_digest", hasher.hexdigest())
        return self._digest

    def since(self, index: int) -> Conversation:
        """The chat from turn `index` on (a user turn), to fit a long chat into the context."""
        return Conversation(turns=self.turns[index:], system_prompt=self.system_prompt)
