"""Prompts for MiniCPM-V 2.5 and 2.6: chat format, picture placeholders, token ids, stop ids.

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

2.6 (`MiniCPMV26Processor`, small overrides) differs where its release differs:
- ChatML: `<|im_start|>{role}\\n{content}<|im_end|>\\n` per message and `<|im_start|>assistant\\n`
  to answer, with Qwen2's default system message ("You are a helpful assistant.") when the chat
  has none; content is not stripped; the tokenizer adds nothing around the text (Qwen2).
- A picture is `<image_id>{n}</image_id>` (n counts the prompt's pictures from 0, with
  `use_image_id`) + `<image>` + query_num `<unk>` + `</image>`, then each slice as
  `<slice>` + query_num `<unk>` + `</slice>`, the grid's rows joined by "\n"; every `<image>` and
  `<slice>` range is a placeholder.
- Stop ids: `<|im_end|>` and `<|endoftext|>`.
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
from .tokenizer import (IMAGE_END, IMAGE_ID_END, IMAGE_ID_START, IMAGE_PAD, IMAGE_START, SLICE_END, SLICE_START,
                        checkpoint_folder, load_tokenizer, token_id)

if TYPE_CHECKING:
    from ...intake.conversation import Conversation, PromptOptions, Turn


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

    def default_system(self) -> str:
        return ""


@dataclass(frozen=True)
class ChatMLFormat:
    """MiniCPM-V 2.6's chat format (Qwen2's ChatML, with its default system message)."""

    start: str = "<|im_start|>"
    end: str = "<|im_end|>"
    system: str = "You are a helpful assistant."

    def opening(self) -> list[Part]:
        return []

    def message(self, role: str, content: list[Part]) -> list[Part]:
        return [Special(self.start), f"{role}\n", *content, Special(self.end), "\n"]

    def generation_prompt(self) -> list[Part]:
        return [Special(self.start), "assistant\n"]

    def stop_tokens(self, tokenizer) -> list[str]:
        return [self.end, "<|endoftext|>"]

    def default_system(self) -> str:
        return self.system


class MiniCPMV25Processor:
    """Pictures to slices, chats to token ids, for MiniCPM-Llama3-V 2.5.

    Not thread-safe (the tokenizer is not): callers take turns.
    """

    version = 2.5
    chat_format: Llama3ChatFormat | ChatMLFormat = Llama3ChatFormat()
    strip_content = True  # 2.5's template trims each message's content
    # The markers whose ranges hold slice embeddings (2.6 adds <slice> .. </slice>).
    placeholder_markers = ((IMAGE_START, IMAGE_END),)
    default_query_num = 96

    def __init__(self, tokenizer, slices: SliceSettings = SliceSettings(), query_num: int | None = None,
                 use_image_id: bool = False) -> None:
        self.tokenizer = tokenizer
        self.slices = slices
        self.query_num = query_num or self.default_query_num
        self.use_image_id = use_image_id
        self._special_ids: dict[str, int] = {}
        self._prefix, self._suffix = _post_processor_additions(tokenizer)
        stops = self.chat_format.stop_tokens(tokenizer)
        self.stop_token_ids: frozenset[int] = frozenset(self._id(token) for token in stops)
        self._starts = {self._id(start) for start, _ in self.placeholder_markers}
        self._ends = {self._id(end) for _, end in self.placeholder_markers}

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike) -> MiniCPMV25Processor:
        """The checkpoint's tokenizer and picture settings: preprocessor_config.json (which the
        release's processor reads), else config.json's `slice_config` and `query_num`. `folder`:
        a local checkpoint folder or a hub id."""
        folder = checkpoint_folder(folder)
        model = _read_json(folder / "config.json")
        settings = dict(model.get("slice_config") or {})
        query_num = model.get("query_num", 96)
        preprocessor = _read_json(folder / "preprocessor_config.json")
        settings.update({key: preprocessor[key] for key in ("max_slice_nums", "scale_resolution", "patch_size")
                         if key in preprocessor})
        query_num = preprocessor.get("image_feature_size", query_num)
        known = {key: settings[key] for key in ("max_slice_nums", "scale_resolution", "patch_size") if key in settings}
        if not preprocessor.get("slice_mode", model.get("slice_mode", True)):
            raise ValueError("checkpoints without slice_mode are not supported (every 2.5 / 2.6 release slices)")
        use_image_id = bool(preprocessor.get("use_image_id", model.get("use_image_id", False)))
        return cls(load_tokenizer(folder), SliceSettings(**known), int(query_num), use_image_id)

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

    def picture_parts(self, size: Size, max_slice_nums: int | None = None, index: int = 0) -> list[Part]:
        """The placeholder of one picture of `size` (width, height), the prompt's picture `index`."""
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
    def content_parts(self, content: str | Sequence[ContentItem], max_slice_nums: int | None = None,
                      first_index: int = 0) -> list[Part]:
        """A message's content: items joined by "\\n" (2.5: surrounding whitespace stripped, as its
        template's `trim` does), pictures as their placeholders, numbered from `first_index`."""
        items = [content] if isinstance(content, str) else list(content)
        joined: list[Part | Size] = []
        for position, item in enumerate(items):
            if position:
                joined.append("\n")
            if isinstance(item, str):
                joined.append(item)
            elif isinstance(item, Image.Image):
                joined.append(tuple(item.size))
            elif isinstance(item, tuple) and len(item) == 2:
                joined.append(tuple(int(side) for side in item))
            else:
                raise TypeError(f"a message holds text and pictures, not {type(item).__name__}")
        if self.strip_content:
            joined = _strip(joined)
        parts: list[Part] = []
        index = first_index
        for item in joined:
            if isinstance(item, tuple):
                parts += self.picture_parts(item, max_slice_nums, index)
                index += 1
            elif item:
                parts.append(item)
        return parts

    def prompt_parts(self, messages: Sequence[dict], system_prompt: str = "",
                     max_slice_nums: int | None = None) -> list[Part]:
        """The whole prompt (without the tokenizer's own additions) ending with the assistant's header.

        `messages`: [{"role": "user" | "assistant", "content": str or [text and pictures]}, ...],
        as the release's `chat()` takes them; the system prompt goes first, as its own message.
        """
        fmt = self.chat_format
        system_prompt = system_prompt or fmt.default_system()
        if system_prompt:
            messages = [{"role": "system", "content": system_prompt}, *messages]
        parts: list[Part] = fmt.opening()
        index = 0
        for message in messages:
            if message["role"] not in ("system", "user", "assistant"):
                raise ValueError(f"unknown role {message['role']!r}")
            parts += fmt.message(message["role"], self.content_parts(message["content"], max_slice_nums, index))
            index += _picture_count(message["content"])
        return parts + fmt.generation_prompt()

    def render(self, messages: Sequence[dict], system_prompt: str = "", max_slice_nums: int | None = None) -> str:
        """The prompt as one string, as the release renders it (before its tokenizer adds a prefix)."""
        return "".join(self.prompt_parts(messages, system_prompt, max_slice_nums))

    def prompt_ids(self, messages: Sequence[dict], system_prompt: str = "",
                   max_slice_nums: int | None = None) -> tuple[list[int], torch.Tensor]:
        """Token ids of the prompt and its slices' placeholder ranges [K, 2]. Pictures may be given
        as their sizes: ids do not depend on pixels."""
        parts = self.prompt_parts(messages, system_prompt, max_slice_nums)
        ids = self._prefix + self.encode_parts(parts) + self._suffix
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
        """Each slice's placeholder range [start, end): after each start marker, up to its end
        marker (how the releases' `_convert` finds them)."""
        starts = [i + 1 for i, token in enumerate(ids) if token in self._starts]
        ends = [i for i, token in enumerate(ids) if token in self._ends]
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

    def turn_length(self, turn: Turn, options: PromptOptions | None = None, first_picture: int = 0) -> int:
        """Exact tokens `turn` takes in a prompt (header, text, placeholders, end of turn).

        Messages are separated by special tokens, so a prompt's length is `prompt_overhead` plus
        the sum of its messages' lengths (the system prompt counts as a message, role "system").
        2.6 numbers pictures: `first_picture` is the number of this turn's first one (its
        digits are tokens; 2.5 ignores it).
        """
        if turn.videos:
            raise ValueError("MiniCPM-V 2.5 and 2.6 do not read videos here: send pictures instead.")
        slices = options.max_slice_nums if options is not None else None
        content = [*(image.image.size for image in turn.images), turn.text]
        return self.message_length(turn.role, content, slices, first_picture)

    def message_length(self, role: str, content: str | Sequence[ContentItem], max_slice_nums: int | None = None,
                       first_picture: int = 0) -> int:
        """Exact tokens one message takes."""
        parts = self.content_parts(content, max_slice_nums, first_picture)
        return len(self.encode_parts(self.chat_format.message(role, parts)))

    @property
    def prompt_overhead(self) -> int:
        """Tokens a prompt has besides its messages: the tokenizer's prefix and suffix, the
        template's opening and the assistant's header (2.6's default system message, used when a
        chat has no system prompt, is a message: `message_length("system", ...)`)."""
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


class MiniCPMV26Processor(MiniCPMV25Processor):
    """Pictures to slices, chats to token ids, for MiniCPM-V 2.6 (see the module docstring)."""

    version = 2.6
    chat_format = ChatMLFormat()
    strip_content = False
    placeholder_markers = ((IMAGE_START, IMAGE_END), (SLICE_START, SLICE_END))
    default_query_num = 64

    def picture_parts(self, size: Size, max_slice_nums: int | None = None, index: int = 0) -> list[Part]:
        """`<image_id>n</image_id>` (with `use_image_id`), the whole picture, then its slices each
        between `<slice>` and `</slice>`, the grid's rows joined by "\\n"."""
        parts: list[Part] = [Special(IMAGE_ID_START), str(index), Special(IMAGE_ID_END)] if self.use_image_id else []
        parts += [Special(IMAGE_START), *[Special(IMAGE_PAD)] * self.query_num, Special(IMAGE_END)]
        grid = slice_grid(size, self.settings_for(max_slice_nums))
        if grid is None:
            return parts
        one = [Special(SLICE_START), *[Special(IMAGE_PAD)] * self.query_num, Special(SLICE_END)]
        columns, rows = grid
        for row in range(rows):
            if row:
                parts.append("\n")
            parts += one * columns
        return parts


def processor_class(version: float | str) -> type[MiniCPMV25Processor]:
    """The processor of a MiniCPM-V 2.x `version` (config.json's)."""
    version = float(version)
    if version == 2.5:
        return MiniCPMV25Processor
    if version == 2.6:
        return MiniCPMV26Processor
    raise ValueError(f"MiniCPM-V {version} is not supported natively (2.5 and 2.6 are)")


def load_processor(folder: str | os.PathLike) -> MiniCPMV25Processor:
    """The processor of a checkpoint folder, by the version its config.json names."""
    version = _read_json(checkpoint_folder(folder) / "config.json").get("version", 2.5)
    return processor_class(version).from_pretrained(folder)


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


def _picture_count(content) -> int:
    return 0 if isinstance(content, str) else sum(1 for item in content if not isinstance(item, str))


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
