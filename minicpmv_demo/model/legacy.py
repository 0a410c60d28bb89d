"""Runs the legacy remote-code MiniCPM-V 2.5 / 2.6 checkpoints through their own `chat()` API.

Their `chat(stream=True)` starts `generate()` on a thread of its own and hands back a text
iterator. The engine calls one request at a time, and this runner always drains that iterator to
the end, even after a cancel: walking away would leave `generate()` running while the engine
starts the next request, which puts two threads in one (possibly bitsandbytes) model.

Of a request's visual settings (`PromptOptions`) only `max_slice_nums` reaches them, and only
where `chat()` takes it (2.6 does, 2.5 does not). `downsample_mode` is a MiniCPM-V 4.6 setting
with no counterpart in these models and is ignored; they are not given videos (`reads_video`).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from ..intake.conversation import Conversation, PromptOptions, Turn
from ..engine.request import SamplingParams

# The MiniCPM-V release's own sampling defaults for chat(): the page starts at them for these
# models (the request's settings are what chat() gets).
CHAT_SAMPLING = {"temperature": 0.7, "top_p": 0.8, "top_k": 100, "repetition_penalty": 1.05}


# Tokens the template adds around one message: an upper bound.
MESSAGE_OVERHEAD = 16


@dataclass
class LegacyPrompt:
    msgs: list[dict]
    image: object | None
    system_prompt: str
    length: int  # estimated tokens, counted as `turn_length` counts them
    thinking: bool = False  # 2.5 / 2.6 never reason
    max_slice_nums: int | None = None  # passed to chat() when it takes it; None: its default


class LegacyRunner:
    """Serial runner for models whose only entry point is `model.chat(...)`."""

    supports_batching = False
    thinks_by_default = False
    reasoning_tags = None  # no reasoning, so nothing for the engine's reasoning budget to count
    reads_video = False

    def __init__(self, model, tokenizer) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.stop_token_ids: frozenset[int] = frozenset()
        # 2.5 takes one image beside the messages; 2.6 and later take images inside the content.
        self.images_in_content = float(getattr(model.config, "version", 2.5)) >= 2.6
        self.context_length = int(getattr(model.config, "max_position_embeddings", 8192))
        # chat() turns each picture into up to max_slice_nums slices plus the whole, each read as
        # query_num tokens (2.5: 96, 2.6: 64) between markers: count the most a picture can take.
        self.default_slices = int(getattr(getattr(model.config, "slice_config", None), "max_slice_nums", 9))
        self.slice_tokens = int(getattr(model.config, "query_num", 96)) + 4
        self.takes_slice_nums = "max_slice_nums" in inspect.signature(model.chat).parameters

    def encode(self, conversation: Conversation) -> LegacyPrompt:
        msgs, first_image = [], None
        for turn in conversation.turns:
            pictures = [image.image for image in turn.images]
            if self.images_in_content:
                msgs.append({"role": turn.role, "content": [*pictures, turn.text]})
            else:
                first_image = first_image or (pictures[0] if pictures else None)
                msgs.append({"role": turn.role, "content": turn.text})
        options = conversation.options
        length = sum(self.turn_length(turn, options) for turn in conversation.turns)
        if conversation.system_prompt:
            length += self.turn_length(Turn("user", conversation.system_prompt), options)
        return LegacyPrompt(msgs=msgs, image=first_image, system_prompt=conversation.system_prompt, length=length,
                            max_slice_nums=options.max_slice_nums if self.takes_slice_nums else None)

    def turn_length(self, turn: Turn, options: PromptOptions = PromptOptions()) -> int:
        """Tokens `turn` may take in chat()'s prompt; chat() builds its prompt itself, so pictures
        are counted at the most they can take with the slice count it will use."""
        slices = options.max_slice_nums if self.takes_slice_nums and options.max_slice_nums else self.default_slices
        text = len(self.tokenizer(turn.text, add_special_tokens=False)["input_ids"])
        return text + MESSAGE_OVERHEAD + (slices + 1) * self.slice_tokens * len(turn.images)

    def stream(self, prompt: LegacyPrompt, params: SamplingParams,
               cancelled: Callable[[], bool]) -> Iterator[str]:
        """Yield text pieces until the model is done; after a cancel, drain without yielding."""
        options = {"top_p": params.top_p, "top_k": params.top_k, "temperature": max(params.temperature, 1e-5),
                   "repetition_penalty": params.repetition_penalty, "do_sample": not params.greedy}
        if prompt.system_prompt:
            options["system_prompt"] = prompt.system_prompt
        if prompt.max_slice_nums is not None:
            options["max_slice_nums"] = prompt.max_slice_nums
        pieces = self.model.chat(image=prompt.image, msgs=prompt.msgs, tokenizer=self.tokenizer,
                                 sampling=True, stream=True, max_new_tokens=params.max_new_tokens,
                                 **options)
        for piece in pieces:
            if not cancelled():
                yield piece
