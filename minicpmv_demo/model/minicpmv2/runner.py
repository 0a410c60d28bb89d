"""MiniCPM-V 2.5 and 2.6 (this package's native models) for the engine: how a conversation becomes
a prompt, and how its pictures enter the text model. Batching is the base's
(model/batched_runner.py): left-padded prefills, preallocated slots, captured decode steps.

These models have only full-attention layers (Llama 3 in 2.5, Qwen2 in 2.6), so their slots are
plain key/value buffers and the decode step's 4-D mask goes to every layer as it is. A prompt
reaches the text model as `inputs_embeds`: the token embeddings of its (padded) ids, with each
slice's resampled features in its placeholder range, as the releases' `get_vllm_embedding`
(`modeling_minicpmv.py`) builds them. Pictures are sliced on the callers' threads (cached per
picture and slice count); the vision tower runs on the engine thread when a prompt is prefilled,
its output cached:
- 2.5 per set of pictures: its tower sees the padding of the slices packed with it (see
  `MiniCPMV25._run_vision`), so a slice's features depend on the others in the prompt, and the
  release reads a prompt's slices together;
- 2.6 per picture: its tower masks each slice to its own patches, so features are exact alone.

Per request: `max_slice_nums` (the page's detail setting) shapes the slices and placeholders;
`downsample_mode` is a MiniCPM-V 4.6 setting with no counterpart here and is ignored. Videos are
not read (`reads_video`): the front ends refuse them before they reach the engine.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import torch

from ...intake.conversation import Conversation, PromptOptions, Turn
from ...system.byte_size import byte_size
from ...system.lru import LruCache
from ..batched_runner import BatchedRunner, PartialPrefill
from .modeling import MiniCPMVBase
from .processing import MiniCPMV25Processor
from .slicing import SlicedPicture
from .tokenizer import token_id

# The release's `chat()` sampling settings (`modeling_minicpmv.py: chat`, sampling=True; the same
# in 2.5 and 2.6): what the page starts at for these models, as `SamplingParams` field names.
CHAT_SAMPLING = {"temperature": 0.7, "top_p": 0.8, "top_k": 100, "repetition_penalty": 1.05}
# Sliced pictures (float32 pixels) by content digest and slice count, in host memory. At full size
# a picture cut into 9 slices of 448 px is about 24 MB; the tiny models' under 1 MB.
IMAGE_CACHE_BYTES = 128 * 2**20
# Resampled features per set of pictures (2.5) or per picture (2.6), where the model runs: at full
# size 2.5's slice is 96 x 4096 values (0.8 MB in 16 bits), a sliced picture about 8 MB.
VISION_CACHE_BYTES = 256 * 2**20
# 2.6 numbers a prompt's pictures and every digit of the number is a token: a turn is measured
# as if its pictures were numbered from here (more than any chat holds), so it is never undercounted.
PICTURE_NUMBER_BOUND = 10**6


@dataclass(frozen=True)
class PictureGroup:
    """Slices the vision tower reads together, and the key their features are cached under."""

    key: str
    pixel_values: tuple[torch.Tensor, ...]  # [3, patch, patches * patch] per slice
    tgt_sizes: torch.Tensor  # [slices, 2]


@dataclass
class Prompt:
    """One conversation, encoded (kept on the CPU until its prefill)."""

    input_ids: torch.Tensor  # [1, L]
    image_bound: torch.Tensor  # [K, 2]: each slice's placeholder range [start, end), in order
    groups: tuple[PictureGroup, ...] = ()  # the prompt's slices, in the placeholders' order
    thinking: bool = False  # 2.5 and 2.6 never reason

    @property
    def length(self) -> int:
        return int(self.input_ids.shape[1])

    @property
    def ids(self) -> torch.Tensor:
        """The prompt's token ids [L] (what a repetition penalty counts as already seen)."""
        return self.input_ids[0]


class MiniCPMV2Runner(BatchedRunner):
    """Runs `MiniCPMV25` / `MiniCPMV26` (model/minicpmv2/modeling.py) for the engine."""

    reads_video = False
    thinks_by_default = False
    reasoning_tags = None  # no `<think>`: nothing for the engine's reasoning budget to count
    chat_sampling = CHAT_SAMPLING  # where the page starts (loading.py: `LoadedModel.sampling_defaults`)

    def __init__(self, model: MiniCPMVBase, processor: MiniCPMV25Processor) -> None:
        embeddings = model.get_input_embeddings().weight
        # The text model's config is the model's own (the releases keep it at the top level); the
        # slots take the embeddings' dtype, which the layers compute in (int4: the compute dtype).
        super().__init__(text_model=model.llm.model, lm_head=model.llm.lm_head, text_layers=model.llm.model.layers,
                         text_config=model.config, dtype=embeddings.dtype, device=embeddings.device,
                         pad_token_id=processor.tokenizer.pad_token_id or 0,
                         capturable=not getattr(model, "is_loaded_in_8bit", False))
        self.model = model
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.stop_token_ids = processor.stop_token_ids  # the release's eos and end-of-turn token
        self.context_length = int(model.config.max_position_embeddings)
        self.per_picture_features = processor.version >= 2.6
        # The processor (its fast tokenizer) is not safe to call from several threads at once:
        # encoding runs on the callers' threads, so they take turns here.
        self._encode_lock = threading.Lock()
        self._markers = frozenset(token_id(self.tokenizer, token)
                                  for pair in processor.placeholder_markers for token in pair)
        self._turn_slack = _turn_slack(processor)
        self._image_cache: LruCache[SlicedPicture] = LruCache(
            IMAGE_CACHE_BYTES, size=lambda picture: byte_size(picture.pixel_values))
        self._vision_cache: LruCache[torch.Tensor] = LruCache(VISION_CACHE_BYTES, size=byte_size)

    # -- encoding (caller threads) ---------------------------------------------------------
    def encode(self, conversation: Conversation) -> Prompt:
        """Token ids and placeholder ranges of the prompt the release's `chat()` builds for
        `conversation` (processing.py), with its pictures sliced once per slice count (cached by
        content digest: follow-up turns resend the same pictures). Raises ValueError for videos."""
        images = conversation.images()
        slices = conversation.options.max_slice_nums
        with self._encode_lock:
            pictures = [self._sliced(image, slices) for image in images]
            encoded = self.processor.encode_conversation(conversation, pictures)
        return Prompt(input_ids=encoded.input_ids, image_bound=encoded.image_bound,
                      groups=self._groups([image.digest for image in images], pictures, slices))

    def turn_length(self, turn: Turn, options: PromptOptions = PromptOptions()) -> int:
        """Tokens `turn` takes in a prompt, never fewer: its exact length (header, text,
        placeholders sized by `options.max_slice_nums`) plus `_turn_slack`, which covers what a
        prompt adds besides its messages and the engine measuring a system prompt as a user turn."""
        with self._encode_lock:
            return self.processor.turn_length(turn, options, first_picture=PICTURE_NUMBER_BOUND) + self._turn_slack

    def _sliced(self, image, max_slice_nums: int | None) -> SlicedPicture:
        key = (image.digest, self.processor.settings_for(max_slice_nums))
        picture = self._image_cache.get(key)
        if picture is None:
            picture = self.processor.slice(image.image, max_slice_nums)
            self._image_cache.put(key, picture)
        return picture

    def _groups(self, digests: list[str], pictures: list[SlicedPicture],
                max_slice_nums: int | None) -> tuple[PictureGroup, ...]:
        """The prompt's slices as the vision tower reads them: one group per picture (2.6), or all
        of them together (2.5, as its release does); keyed by the slice count and digests."""
        if not pictures:
            return ()
        slices = self.processor.settings_for(max_slice_nums).max_slice_nums
        parts = [[(digest, picture)] for digest, picture in zip(digests, pictures, strict=True)]
        if not self.per_picture_features:
            parts = [[part for group in parts for part in group]]
        return tuple(PictureGroup(key=f"{slices}:" + "|".join(digest for digest, _ in group),
                                  pixel_values=tuple(pixels for _, picture in group for pixels in picture.pixel_values),
                                  tgt_sizes=torch.cat([picture.tgt_sizes for _, picture in group]))
                     for group in parts)

    # -- how pictures enter the text model (engine thread) ---------------------------------
    def _prefill_inputs(self, prompts: list[Prompt], input_ids: torch.Tensor, pads: list[int]) -> dict:
        """Each row's embeddings with its slices' features in its placeholders, shifted by the
        row's left padding."""
        rows = [self.model.embed_prompt(input_ids[row:row + 1], prompt.image_bound + pad,
                                        features=self._features(prompt))
                for row, (prompt, pad) in enumerate(zip(prompts, pads, strict=True))]
        return {"inputs_embeds": torch.cat(rows)}

    def _piece_inputs(self, partial: PartialPrefill, start: int, input_ids: torch.Tensor) -> dict:
        """A piece's embeddings; the piece that reaches the placeholders holds all of them (see
        `_visual_span`) and gets all the features."""
        prompt: Prompt = partial.prompt
        end = start + input_ids.shape[1]
        if not prompt.groups or start >= int(prompt.image_bound[-1, 1]) or end <= int(prompt.image_bound[0, 0]):
            return {"inputs_embeds": self.model.embed_prompt(input_ids)}
        return {"inputs_embeds": self.model.embed_prompt(input_ids, prompt.image_bound - start,
                                                         features=self._features(prompt))}

    def _device_caches(self) -> list[LruCache]:
        return [self._vision_cache]

    def _visual_span(self, ids: list[int]) -> tuple[int, int] | None:
        """From the first picture marker to the last: a piece never splits what lies between."""
        at = [index for index, token in enumerate(ids) if token in self._markers]
        return (at[0], at[-1] + 1) if at else None

    def _features(self, prompt: Prompt) -> torch.Tensor | None:
        """The prompt's slice features [K, query_num, hidden] in placeholder order (None without
        pictures), each group through the vision tower once while it stays cached."""
        parts = []
        for group in prompt.groups:
            features = self._vision_cache.get(group.key)
            if features is None:
                features = self.model.vision_features(list(group.pixel_values), group.tgt_sizes)
                self._vision_cache.put(group.key, features)
            parts.append(features)
        return torch.cat(parts) if parts else None


def _turn_slack(processor: MiniCPMV25Processor) -> int:
    """Tokens a prompt may hold beyond its turns' exact lengths: the tokenizer's prefix, the
    template's opening and the assistant's header (`prompt_overhead`), 2.6's default system
    message (a chat without a system prompt gets it), and the difference between the roles'
    headers (the engine measures a system prompt as a user turn)."""
    default_system = processor.chat_format.default_system()
    headers = [processor.message_length(role, "") for role in ("system", "user", "assistant")]
    system = processor.message_length("system", default_system) if default_system else 0
    return processor.prompt_overhead + system + max(headers) - min(headers)
