"""Prompts for MiniCPM-V 2.5: chat format, picture placeholders, token ids, stop ids.

What the 2.5 release's `chat()` builds (`modeling_minicpmv.py: chat`, the chat template in its
tokenizer_config.json, `processing_minicpmv.py: _convert`, `image_processing_minicpmv.py:
get_slice_image_placeholder`), written out here without a template engine:

    <|begin_of_text|>                       <- added by the tokenizer's post-processor (see below)
    <|begin_of_text|><|start_header_id|>system<|end_header_id|>\\n\\n{system}<|eot_id|>   (if any)
    <|start_header_id|>user<|end_header_id|>\\n\\n{picture}\\n{picture}\\n{text}<|eot_id|>
    <|start_header_id|>assistant<|end_header_id|>\\n\\n{answer}<|eot_id|>
    ...
    <|start_header_id|>assistant<|end_header_id|>\\n\\n

- A message's items (pictures and text, in order) are joined with "\\n" and the result is
  stripped of surrounding whitespace, as the template's `trim` does. A picture is
  `<image>` + query_num `<unk>` + `</image>` for the whole picture, then, if it is sliced,
  `<slice>` + its grid's rows (each row's slices side by side, rows joined by "\\n") + `</slice>`.
- The template writes `<|begin_of_text|>` before the first message, and the release encodes the
  rendered prompt with the tokenizer's special tokens on (`tokenizer.encode(text)`), whose
  post-processor (Llama 3's tokenizer.json) adds another: the prompt starts with the token twice.
  That is the release's quirk, and the model was served that way, so it is kept; the prefix is
  whatever the checkpoint's post-processor adds, read from the tokenizer, not hard-coded.
- Several pictures: the release's `chat()` takes pictures inside a message's content too (its
  `image` argument is only put in front of the first message), each where it appears: the same
  here, so a turn's pictures come first, in order, then its text; later turns' pictures sit in
  their own turns.
- Stop ids: `<|end_of_text|>` (the tokenizer's eos) and `<|eot_id|>`, as the release's generate.

Differences on purpose, all outside what the release computes for an ordinary chat:
- Text is encoded piece by piece between special tokens, with special-token strings in user or
  assistant text read as plain text (the release would turn a typed "<image>" into a placeholder
  and fail). For text without such strings the ids are the release's: special tokens split the
  text into independent pieces in the tokenizer anyway.
- No question without a picture fails (the release's image processor raises IndexError), and
  nothing is cut at 2048 tokens (the release's `max_inp_length`, which can cut through a picture):
  fitting a chat into the context is the engine's job.
- Videos are refused.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Union

import torch
from PIL import Image

from .config import SliceSettings
from .slicing import SlicedPicture, Size, slice_grid, slice_picture
from .tokenizer import IMAGE_END, IMAGE_PAD, IMAGE_START, SLICE_END, SLICE_START, load_tokenizer, token_id

if TYPE_CHECKING:
    from ...conversation import Conversation, PromptOptions, Turn


class Special(str):
    """A special token in a prompt's parts (a plain `str` part is text)."""


Part = Union[str, Special]
# A message's content: text and pictures (a PIL image, or only its (width, height) when just the
# token ids or their count are wanted).
ContentItem = Union[str, Image.Image, Size]


@dataclass
class EncodedPrompt:
    """One prompt, ready for `MiniCPMVBase.embed_prompt` (batch of one, on the CPU)."""

    input_ids: torch.Tensor  # [1, L] int64
    image_bound: torch.Tensor  # [K, 2] int64: each slice's placeholder range [start, end)
    pixel_values: list[torch.Tensor] = field(default_factory=list)  # K slices, pictures in order
    tgt_sizes: torch.Tensor = field(default_factory=lambda: torch.zeros((0, 2), dtype=torch.int32))
    picture_slices: list[int] = field(default_factory=list)  # slices per picture (sum K)

    @property
    def length(self) -> int:
        return int(self.input_ids.shape[1])


@dataclass(frozen=True)
class Llama3ChatFormat:
    """MiniCPM-V 2.5's chat format (Llama 3's headers, `<|begin_of_text|>` before the first message)."""

    begin: str = "<|begin_of_text|>"
    header_start: str = "<|start_header_id|>"
    header_end: str = "<|end_header_id|>"
    end_of_turn: str = "<|eot_id|>"

    def opening(self) -> list[Part]:
        return [Special(self.begin)]

    def message(self, role: str, content: list[Part]) -> list[Part]:
        return [Special(self.header_start), role, Special(self.header_end), "\n\n", *content, Special(self.end_of_turn)]

    def generation_prompt(self) -> list[Part]:
        return [Special(self.header_start), "assistant", Special(self.header_end), "\n\n"]

    def stop_tokens(self, tokenizer) -> list[str]:
        return [tokenizer.eos_token, self.end_of_turn]


class MiniCPMV25Processor:
    """Pictures to slices, chats to token ids, for MiniCPM-Llama3-V 2.5.

    Not thread-safe (the tokenizer is not): callers take turns.
    """

    version = 2.5
    chat_format = Llama3ChatFormat()

    def __init__(self, tokenizer, slices: SliceSettings = SliceSettings(), query_num: int = 96) -> None:
        self.tokenizer = tokenizer
        self.slices = slices
        self.query_num = query_num
        self._special_ids: dict[str, int] = {}
        self._prefix, self._suffix = _post_processor_additions(tokenizer)
        self.stop_token_ids: frozenset[int] = frozenset(self._id(token) for token in self.chat_format.stop_tokens(tokenizer))
        self.image_start_id, self.image_end_id = self._id(IMAGE_START), self._id(IMAGE_END)

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike) -> MiniCPMV25Processor:
        """The checkpoint's tokenizer and picture settings: preprocessor_config.json (which the
        release's processor reads), else config.json's `slice_config` and `query_num`."""
        folder = Path(folder)
        model = _read_json(folder / "config.json")
        settings = dict(model.get("slice_config") or {})
        query_num = model.get("query_num", 96)
        preprocessor = _read_json(folder / "preprocessor_config.json")
        settings.update({key: preprocessor[key] for key in ("max_slice_nums", "scale_resolution", "patch_size")
                         if key in preprocessor})
        query_num = preprocessor.get("image_feature_size", query_num)
        known = {key: settings[key] for key in ("max_slice_nums", "scale_resolution", "patch_size") if key in settings}
        return cls(load_tokenizer(folder), SliceSettings(**known), int(query_num))

    # -- pictures ---------------------------------------------------------------------------
    def settings_for(self, max_slice_nums: int | None) -> SliceSettings:
        """The slice settings with a request's own slice count (None: the checkpoint's)."""
        if max_slice_nums is None:
            return self.slices
        if isinstance(max_slice_nums, bool) or not isinstance(max_slice_nums, int) or max_slice_nums < 1:
            raise ValueError(f"max_slice_nums must be a whole number of at least 1, not {max_slice_nums!r}")
        return SliceSettings(max_slice_nums, self.slices.scale_resolution, self.slices.patch_size)

    def slice(self, image: Image.Image, max_slice_nums: int | None = None) -> SlicedPicture:
        """One picture's pixels for the vision tower (the whole picture, then its slices)."""
        return slice_picture(image, self.settings_for(max_slice_nums))

    def picture_parts(self, size: Size, max_slice_nums: int | None = None) -> list[Part]:
        """The placeholder of one picture of `size` (width, height)."""
        one = [Special(IMAGE_START), *[Special(IMAGE_PAD)] * self.query_num, Special(IMAGE_END)]
        grid = slice_grid(size, self.settings_for(max_slice_nums))
        if grid is None:
            return one
        columns, rows = grid
        parts: list[Part] = [*one, Special(SLICE_START)]
        for row in range(rows):
            if row:
                parts.append("\n")
            parts += one * columns
        parts.append(Special(SLICE_END))
        return parts

    # -- chats ------------------------------------------------------------------------------
    def content_parts(self, content: str | Sequence[ContentItem], max_slice_nums: int | None = None) -> list[Part]:
        """A message's content: items joined by "\\n", surrounding whitespace stripped (the
        template's `trim`), pictures as their placeholders."""
        items = [content] if isinstance(content, str) else list(content)
        joined: list[Part | Size] = []
        for index, item in enumerate(items):
            if index:
                joined.append("\n")
            if isinstance(item, str):
                joined.append(item)
            elif isinstance(item, Image.Image):
                joined.append(tuple(item.size))
            elif isinstance(item, tuple) and len(item) == 2:
                joined.append(tuple(int(side) for side in item))
            else:
                raise TypeError(f"a message holds text and pictures, not {type(item).__name__}")
        parts: list[Part] = []
        for item in _strip(joined):
            parts += self.picture_parts(item, max_slice_nums) if isinstance(item, tuple) else [item]
        return parts

    def prompt_parts(self, messages: Sequence[dict], system_prompt: str = "",
                     max_slice_nums: int | None = None) -> list[Part]:
        """The whole prompt (without the tokenizer's own additions) ending with the assistant's header.

        `messages`: [{"role": "user" | "assistant", "content": str or [text and pictures]}, ...],
        as the release's `chat()` takes them; the system prompt goes first, as its own message.
        """
        fmt = self.chat_format
        if system_prompt:
            messages = [{"role": "system", "content": system_prompt}, *messages]
        parts: list[Part] = fmt.opening()
        for message in messages:
            if message["role"] not in ("system", "user", "assistant"):
                raise ValueError(f"unknown role {message['role']!r}")
            parts += fmt.message(message["role"], self.content_parts(message["content"], max_slice_nums))
        return parts + fmt.generation_prompt()

    def render(self, messages: Sequence[dict], system_prompt: str = "", max_slice_nums: int | None = None) -> str:
        """The prompt as one string, as the release renders it (before its tokenizer adds a prefix)."""
        return "".join(self.prompt_parts(messages, system_prompt, max_slice_nums))

    def prompt_ids(self, messages: Sequence[dict], system_prompt: str = "",
                   max_slice_nums: int | None = None) -> tuple[list[int], torch.Tensor]:
        """Token ids of the prompt and its slices' placeholder ranges [K, 2]. Pictures may be given
        as their sizes: ids do not depend on pixels."""
        ids = self._prefix + self.encode_parts(self.prompt_parts(messages, system_prompt, max_slice_nums)) + self._suffix
        return ids, self.image_bound(ids)

    def encode(self, messages: Sequence[dict], system_prompt: str = "", max_slice_nums: int | None = None,
               pictures: Sequence[SlicedPicture] | None = None) -> EncodedPrompt:
        """Token ids, placeholder ranges and pixels of a prompt. `pictures`: the messages' pictures
        already sliced with the same `max_slice_nums` (e.g. from a cache), in order; else they are
        sliced here."""
        ids, bound = self.prompt_ids(messages, system_prompt, max_slice_nums)
        if pictures is None:
            pictures = [self.slice(item, max_slice_nums) for item in _pictures(messages)]
        prompt = EncodedPrompt(input_ids=torch.tensor([ids], dtype=torch.long), image_bound=bound,
                               picture_slices=[picture.slice_count for picture in pictures])
        if pictures:
            prompt.pixel_values = [pixels for picture in pictures for pixels in picture.pixel_values]
            prompt.tgt_sizes = torch.cat([picture.tgt_sizes for picture in pictures])
        if len(prompt.pixel_values) != len(bound):
            raise ValueError(f"the prompt has {len(bound)} slice placeholders but {len(prompt.pixel_values)} "
                             "slices of pixels: slice the pictures with the prompt's max_slice_nums")
        return prompt

    def image_bound(self, ids: Sequence[int]) -> torch.Tensor:
        """Each slice's placeholder range [start, end): after each `<image>`, up to its `</image>`
        (how the release's `_convert` finds them)."""
        starts = [i + 1 for i, token in enumerate(ids) if token == self.image_start_id]
        ends = [i for i, token in enumerate(ids) if token == self.image_end_id]
        if len(starts) != len(ends):
            raise ValueError("unbalanced picture markers in the prompt")
        return torch.tensor(list(zip(starts, ends, strict=True)), dtype=torch.long).reshape(-1, 2)

    # -- the project's conversations ----------------------------------------------------------
    def messages(self, conversation: Conversation) -> list[dict]:
        """The project's `Conversation` as `chat()` messages: each turn's pictures, then its text."""
        if conversation.videos():
            raise ValueError("MiniCPM-V 2.5 and 2.6 do not read videos here: send pictures instead.")
        return [{"role": turn.role, "content": [*(image.image for image in turn.images), turn.text]}
                for turn in conversation.turns]

    def encode_conversation(self, conversation: Conversation,
                            pictures: Sequence[SlicedPicture] | None = None) -> EncodedPrompt:
        """`encode` for the project's `Conversation` (its system prompt and `max_slice_nums`)."""
        return self.encode(self.messages(conversation), conversation.system_prompt,
                           conversation.options.max_slice_nums, pictures)

    def turn_length(self, turn: Turn, options: PromptOptions | None = None) -> int:
        """Exact tokens `turn` takes in a prompt (header, text, placeholders, end of turn).

        Messages are separated by special tokens, so a prompt's length is `prompt_overhead` plus
        the sum of its messages' lengths (the system prompt counts as a message, role "system").
        """
        if turn.videos:
            raise ValueError("MiniCPM-V 2.5 and 2.6 do not read videos here: send pictures instead.")
        slices = options.max_slice_nums if options is not None else None
        return self.message_length(turn.role, [*(image.image.size for image in turn.images), turn.text], slices)

    def message_length(self, role: str, content: str | Sequence[ContentItem], max_slice_nums: int | None = None) -> int:
        """Exact tokens one message takes."""
        return len(self.encode_parts(self.chat_format.message(role, self.content_parts(content, max_slice_nums))))

    @property
    def prompt_overhead(self) -> int:
        """Tokens a prompt has besides its messages: the tokenizer's prefix and suffix, the
        template's opening and the assistant's header."""
        fmt = self.chat_format
        return len(self._prefix) + len(self._suffix) + len(self.encode_parts(fmt.opening() + fmt.generation_prompt()))

    # -- tokens ------------------------------------------------------------------------------
    def encode_parts(self, parts: Iterable[Part]) -> list[int]:
        """Ids of prompt parts: each run of text encoded as one piece (special-token strings in
        it read as text), special tokens by their ids."""
        ids: list[int] = []
        text: list[str] = []
        for part in [*parts, Special("")]:
            if not isinstance(part, Special):
                text.append(part)
                continue
            if text:
                ids += self.tokenizer.encode("".join(text), add_special_tokens=False, split_special_tokens=True)
                text.clear()
            if part:
                ids.append(self._id(part))
        return ids

    def _id(self, token: str) -> int:
        if token not in self._special_ids:
            self._special_ids[token] = token_id(self.tokenizer, token)
        return self._special_ids[token]


def _post_processor_additions(tokenizer) -> tuple[list[int], list[int]]:
    """What the tokenizer adds around an encoded text (Llama 3: `<|begin_of_text|>` in front)."""
    probe = "a"
    plain = tokenizer.encode(probe, add_special_tokens=False)
    full = tokenizer.encode(probe, add_special_tokens=True)
    for start in range(len(full) - len(plain) + 1):
        if full[start : start + len(plain)] == plain:
            return full[:start], full[start + len(plain) :]
    raise ValueError("cannot tell what the tokenizer adds around a text")


def _strip(items: list[Part | Size]) -> list[Part | Size]:
    """`str.strip()` over text and pictures joined: whitespace goes from the outer text ends only."""
    items = list(items)
    for step in (1, -1):
        order = range(len(items)) if step == 1 else range(len(items) - 1, -1, -1)
        for index in order:
            item = items[index]
            if not isinstance(item, str):
                break
            items[index] = item.lstrip() if step == 1 else item.rstrip()
            if items[index]:
                break
    return [item for item in items if not isinstance(item, str) or item]


def _pictures(messages: Sequence[dict]) -> list[Image.Image]:
    pictures = []
    for message in messages:
        content = message["content"]
        if isinstance(content, str):
            continue
        for item in content:
            if isinstance(item, tuple):
                raise ValueError("a picture given by its size only has no pixels to encode")
            if isinstance(item, Image.Image):
                pictures.append(item)
    return pictures


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}
