"""A chat as the model sees it: turns of text, validated images and videos, plus a system prompt.

This is the hand-over format between the UI side (which parses Gradio's messages and checks
uploads) and the model side (which renders it with a chat template). Neither side needs to know
the other's formats.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

from .images import PreparedImage

if TYPE_CHECKING:  # videos.py imports PyAV: the engine must import where it is missing (a bare GPU box)
    from .videos import PreparedVideo

# The widest choices a request may make about how its prompt is built (the engine's door).
DOWNSAMPLE_MODES = ("16x", "4x")
MAX_SLICE_NUMS = 36
MAX_NUM_FRAMES = 128


@dataclass(frozen=True)
class PromptOptions:
    """Per-request choices that change the prompt itself rather than the decoding.

    None means "what the checkpoint does by default" (the runner knows: an Instruct checkpoint
    answers without thinking, a Thinking one thinks; 9 slices per picture for 4.6). Checked when
    built, like `SamplingParams`, so no front end can hand the model a value it cannot take.
    """

    enable_thinking: bool | None = None
    downsample_mode: Literal["16x", "4x"] = "16x"  # "4x": four times the visual tokens, finer detail
    max_slice_nums: int | None = None  # slices per picture, 1..MAX_SLICE_NUMS
    max_num_frames: int | None = None  # frames taken from a video, 1..MAX_NUM_FRAMES

    def __post_init__(self) -> None:
        if self.enable_thinking is not None and not isinstance(self.enable_thinking, bool):
            raise ValueError(f"enable_thinking must be true or false, not {self.enable_thinking!r}.")
        if self.downsample_mode not in DOWNSAMPLE_MODES:
            raise ValueError(f"downsample_mode must be one of {', '.join(DOWNSAMPLE_MODES)}, not {self.downsample_mode!r}.")
        for name, high in (("max_slice_nums", MAX_SLICE_NUMS), ("max_num_frames", MAX_NUM_FRAMES)):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= high):
                raise ValueError(f"{name} must be a whole number from 1 to {high}, not {value!r}.")


@dataclass(frozen=True)
class Turn:
    role: Literal["user", "assistant"]
    text: str
    images: tuple[PreparedImage, ...] = ()
    videos: tuple[PreparedVideo, ...] = ()  # each already sampled to the request's frames


@dataclass(frozen=True)
class Conversation:
    """The whole chat so far; the last turn is the user's question to answer."""

    turns: tuple[Turn, ...]
    system_prompt: str = ""
    options: PromptOptions = PromptOptions()
    _digest: str = field(default="", init=False, repr=False, compare=False)

    def images(self) -> list[PreparedImage]:
        return [image for turn in self.turns for image in turn.images]

    def videos(self) -> list[PreparedVideo]:
        return [video for turn in self.turns for video in turn.videos]

    def to_template_messages(self) -> list[dict]:
        """Messages for `processor.apply_chat_template`: images first in a turn, then videos, then
        its text."""
        messages: list[dict] = []
        if self.system_prompt:
            messages.append({"role": "system", "content": [{"type": "text", "text": self.system_prompt}]})
        for turn in self.turns:
            content = [{"type": "image"} for _ in turn.images] + [{"type": "video"} for _ in turn.videos]
            content.append({"type": "text", "text": turn.text})
            messages.append({"role": turn.role, "content": content})
        return messages

    def digest(self) -> str:
        """Identity of the chat for the reply cache: images and videos by content hash (of the
        frames taken), never by file name."""
        if not self._digest:
            hasher = hashlib.sha256(f"{self.options!r}\x00{self.system_prompt}".encode())
            for turn in self.turns:
                hasher.update(f"\x00{turn.role}\x00{turn.text}".encode())
                for image in turn.images:
                    hasher.update(image.digest.encode())
                for video in turn.videos:
                    hasher.update(f"video:{video.digest}".encode())
            object.__setattr__(self, "_digest", hasher.hexdigest())
        return self._digest

    def since(self, index: int) -> Conversation:
        """The chat from turn `index` on (a user turn), to fit a long chat into the context."""
        return Conversation(turns=self.turns[index:], system_prompt=self.system_prompt, options=self.options)
