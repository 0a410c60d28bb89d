"""MiniCPM-V 4.x (4.6, 4.7) through transformers' own classes: how a conversation becomes a prompt,
and how its pictures and videos enter the text model. The text model's batching is the base's
(model/batched_runner.py).

MiniCPM-V 4.6's text model mixes full-attention layers with linear-attention layers (a
fixed-size state per row); the slots and steps of the base handle both. The vision tower reads
images NaViT-packed for one sample at a time, so it runs per prompt (and its output is cached per
set of images and settings); the text model then prefills all newcomers at once. Each prompt
brings its own visual settings (`PromptOptions.downsample_mode`, `max_slice_nums`): they shape its
placeholders and its pass through the vision tower, so rows with different settings still share
one batch. A video is read as frames through the processor's video path and scattered over its
own placeholder token, beside any pictures."""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass

import torch
from transformers.modeling_outputs import BaseModelOutputWithPooling

from ...system.byte_size import byte_size
from ...intake.conversation import Conversation, PromptOptions, Turn
from ...engine.reasoning_budget import reasoning_tags
from ...system.lru import LruCache
from ...engine.reasoning import prompt_opens_reasoning
from ..batched_runner import BatchedRunner, PartialPrefill

log = logging.getLogger(__name__)


# Tokens the chat template adds around one message, picture or video (role markers, image ids):
# an upper bound, so a chat measured turn by turn is never longer than counted.
MESSAGE_OVERHEAD = 16
# MiniCPM-V 4.6 reads each video frame whole, as one slice, without image ids (as its authors
# run video): more slices per frame would multiply a clip's tokens by up to 37.
VIDEO_SLICE_NUMS = 1
# Preprocessed pictures and video frames (pixels and placeholder text) remembered by content
# digest and visual settings, in host memory. 128 MB: at full size a 1344-px picture becomes
# 23 MB of float32 pixels (10 slices of 448 px), so a message of four and then some; the tiny
# model's are under 1 MB each. A video's 32 default frames take about 77 MB at full size.
IMAGE_CACHE_BYTES = 128 * 2**20
# Vision-tower outputs remembered per set of pictures or video frames and their settings:
# follow-up questions about the same pictures (and visitors clicking the same example) skip the
# vision tower. They live where the model runs (GPU memory, which the batch's key/value cache
# needs too); at full size a large picture's features take tens of MB, so 256 MB keep a few
# sets of pictures.
VISION_CACHE_BYTES = 256 * 2**20


@dataclass
class Prompt:
    """One conversation, encoded: the processor's tensors for a batch of one (kept on the CPU)."""

    inputs: dict[str, torch.Tensor]
    images_key: str = ""  # the visual settings and the images' content digests; "" without images
    videos_key: str = ""  # the same for videos; "" without videos
    downsample_mode: str = "16x"  # what the vision tower does with this prompt's pictures and frames
    thinking: bool = False  # the prompt ends inside an open `<think>`: the reply starts as reasoning

    @property
    def length(self) -> int:
        return int(self.inputs["input_ids"].shape[1])

    @property
    def ids(self) -> torch.Tensor:
        """The prompt's token ids [L] (what a repetition penalty counts as already seen)."""
        return self.inputs["input_ids"][0]


class MiniCPMV4Runner(BatchedRunner):
    """Runs `AutoModelForImageTextToText` MiniCPM-V 4.x checkpoints for the engine."""

    reads_video = True  # through the processor's video path (MiniCPM-V 4.6 and later)

    def __init__(self, model, processor, thinks_by_default: bool = False) -> None:
        """`thinks_by_default`: what a request that does not choose gets (a Thinking checkpoint
        thinks, an Instruct one answers straight away; see loading.py)."""
        super().__init__(text_model=model.model, lm_head=model.lm_head, text_layers=model.model.language_model.layers,
                         text_config=model.config.text_config, dtype=model.dtype, device=model.device,
                         pad_token_id=processor.tokenizer.pad_token_id or 0,
                         capturable=not getattr(model, "is_loaded_in_8bit", False))
        self.model = model
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.thinks_by_default = thinks_by_default
        self.reasoning_tags = reasoning_tags(self.tokenizer)
        # Templates with Qwen3.5's switch get it on every request, never their own default (4.6
        # Instruct's template thinks unless told not to); others are not handed a stray variable.
        self._template_switches_thinking = "enable_thinking" in (processor.chat_template or "")
        # Fast tokenizers are not safe to call from several threads at once ("Already borrowed"):
        # encoding runs on the callers' threads, so it takes turns here instead of in the engine.
        self._encode_lock = threading.Lock()
        eos = model.generation_config.eos_token_id
        eos_ids = eos if isinstance(eos, list) else [eos]
        self.stop_token_ids = frozenset(i for i in [*eos_ids, self.tokenizer.eos_token_id] if i is not None)
        self.context_length = int(getattr(model.config.text_config, "max_position_embeddings", 32768))
        self._vision_cache: LruCache[list[torch.Tensor]] = LruCache(VISION_CACHE_BYTES, size=byte_size)
        self._image_cache: LruCache[tuple] = LruCache(IMAGE_CACHE_BYTES, size=byte_size)

    # -- encoding (caller threads) ---------------------------------------------------------
    def encode(self, conversation: Conversation) -> Prompt:
        """Apply the chat template and the processor; pictures and videos go in their order.

        Does what `processor(images=..., videos=..., text=...)` does, but preprocesses each picture
        and video once per visual setting (cached by content digest): follow-up turns resend the
        same ones every time. Pictures get image ids when the checkpoint uses them; videos never do.
        """
        options = conversation.options
        text = self.render(conversation)
        thinking = prompt_opens_reasoning(text)
        images, videos = conversation.images(), conversation.videos()
        with self._encode_lock:
            if not images and not videos:
                return Prompt(inputs=dict(self.processor(text=[text], return_tensors="pt")), thinking=thinking)
            image_parts = [self._preprocessed(image, options) for image in images]
            video_parts = [self._preprocessed_video(video, options) for video in videos]
            image_texts = [replacement for _, _, replacement in image_parts]
            if image_texts and self.processor.default_use_image_id:
                image_texts = self.processor._prepend_local_ids([text], image_texts, self.processor.image_token)
            texts, _ = self.processor.get_text_with_replacements(
                [text], image_texts, [replacement for _, _, replacement in video_parts])
            inputs = dict(self.tokenizer(texts, return_tensors="pt"))
        prompt = Prompt(inputs=inputs, downsample_mode=options.downsample_mode, thinking=thinking)
        if image_parts:
            inputs["pixel_values"] = torch.cat([pixels for pixels, _, _ in image_parts], dim=-1)
            inputs["target_sizes"] = torch.cat([sizes for _, sizes, _ in image_parts])
            prompt.images_key = _visual_key("image", options, [image.digest for image in images])
        if video_parts:
            inputs["pixel_values_videos"] = torch.cat([pixels for pixels, _, _ in video_parts], dim=-1)
            inputs["target_sizes_videos"] = torch.cat([sizes for _, sizes, _ in video_parts])
            prompt.videos_key = _visual_key("video", options, [video.digest for video in videos])
        return prompt

    def render(self, conversation: Conversation) -> str:
        """The prompt text the chat template makes of `conversation`, with the thinking switch
        set from the request's choice, else the checkpoint's default."""
        switch = {}
        if self._template_switches_thinking:
            chosen = conversation.options.enable_thinking
            switch["enable_thinking"] = self.thinks_by_default if chosen is None else chosen
        return self.processor.apply_chat_template(conversation.to_template_messages(), add_generation_prompt=True,
                                                  tokenize=False, **switch)

    def turn_length(self, turn: Turn, options: PromptOptions = PromptOptions()) -> int:
        """Tokens `turn` takes in a prompt with `options`: its text, its pictures' and videos'
        placeholders (which the visual settings size), the template's markers (MESSAGE_OVERHEAD,
        an upper bound). Fitting a long chat reads this, newest first."""
        with self._encode_lock:
            placeholders = [self._preprocessed(image, options)[2] for image in turn.images]
            placeholders += [self._preprocessed_video(video, options)[2] for video in turn.videos]
            counts = self.tokenizer([turn.text, *placeholders], add_special_tokens=False)["input_ids"]
        return sum(len(ids) for ids in counts) + MESSAGE_OVERHEAD * (1 + len(placeholders))

    def _preprocessed(self, image, options: PromptOptions) -> tuple[torch.Tensor, torch.Tensor, str]:
        """One picture through the image processor with the request's detail and slice count:
        packed pixels, slice sizes, placeholder text. None keeps the checkpoint's slice count."""
        key = ("image", image.digest, options.downsample_mode, options.max_slice_nums)
        cached = self._image_cache.get(key)
        if cached is None:
            settings = {"downsample_mode": options.downsample_mode}
            if options.max_slice_nums is not None:
                settings["max_slice_nums"] = options.max_slice_nums
            processed, (replacement,) = self.processor._process_images([[image.image]], return_tensors="pt",
                                                                        **settings)
            cached = (processed["pixel_values"], processed["target_sizes"], replacement)
            self._image_cache.put(key, cached)
        return cached

    def _preprocessed_video(self, video, options: PromptOptions) -> tuple[torch.Tensor, torch.Tensor, str]:
        """One video's frames through the processor's video path (frames already sampled, each
        read whole): packed pixels, frame sizes, placeholder text."""
        key = ("video", video.digest, options.downsample_mode)
        cached = self._image_cache.get(key)
        if cached is None:
            processed, (replacement,) = self.processor._process_videos(
                [list(video.frames)], return_tensors="pt", do_sample_frames=False,
                max_slice_nums=VIDEO_SLICE_NUMS, downsample_mode=options.downsample_mode)
            cached = (processed["pixel_values_videos"], processed["target_sizes_videos"], replacement)
            self._image_cache.put(key, cached)
        return cached

    # -- how pictures and videos enter the text model (engine thread) ------------------------
    def _prefill_inputs(self, prompts: list[Prompt], input_ids: torch.Tensor, pads: list[int]) -> dict:
        """The ids and the prompts' visual features, computed ahead (and cached) per prompt: the
        model scatters them over the placeholder tokens in row order."""
        return {"input_ids": input_ids,
                **_encoder_outputs([part for prompt in prompts for part in self._visual_features(prompt, "image")],
                                   [part for prompt in prompts for part in self._visual_features(prompt, "video")])}

    def _piece_inputs(self, partial: PartialPrefill, start: int, input_ids: torch.Tensor) -> dict:
        """A piece that reaches the placeholders carries all of its pictures' and videos' features."""
        if partial.images is None or start >= partial.images[1] or start + input_ids.shape[1] <= partial.images[0]:
            return {"input_ids": input_ids}
        return {"input_ids": input_ids, **_encoder_outputs(self._visual_features(partial.prompt, "image"),
                                                            self._visual_features(partial.prompt, "video"))}

    def _visual_span(self, ids: list[int]) -> tuple[int, int] | None:
        visual = {self.model.config.image_token_id, self.model.config.video_token_id}
        at = [i for i, token in enumerate(ids) if token in visual]
        return (at[0], at[-1] + 1) if at else None

    def _device_caches(self) -> list[LruCache]:
        return [self._vision_cache]

    def _step_mask(self, visible: torch.Tensor) -> dict:
        """Full-attention layers read the slot columns' visibility; a one-token step of the
        linear-attention layers is never padding."""
        return {"full_attention": super()._step_mask(visible), "linear_attention": None}

    def _visual_features(self, prompt: Prompt, kind: str) -> list[torch.Tensor]:
        """The merged visual tokens of the prompt's pictures (`kind` "image") or video frames
        ("video"), one tensor per slice or frame, in order; [] when it has none.

        Only these are kept: the vision tower's last hidden states are not read by the text
        model and would take most of the cache's bytes. The key holds the visual settings, so
        the same picture read at another detail is another entry.
        """
        key = prompt.images_key if kind == "image" else prompt.videos_key
        if not key:
            return []
        pooled = self._vision_cache.get(key)
        if pooled is None:
            suffix = "" if kind == "image" else "_videos"
            pixels = prompt.inputs[f"pixel_values{suffix}"][:1].to(self.device, self.model.dtype)
            sizes = prompt.inputs[f"target_sizes{suffix}"].to(self.device)
            features = self.model.model.get_image_features if kind == "image" else self.model.model.get_video_features
            pooled = list(features(pixels, sizes, downsample_mode=prompt.downsample_mode).pooler_output)
            self._vision_cache.put(key, pooled)
        return pooled


def _visual_key(kind: str, options: PromptOptions, digests: list[str]) -> str:
    """Vision-cache key of a prompt's pictures or videos: the settings that shape their features,
    then their digests in order. Videos are always read at VIDEO_SLICE_NUMS."""
    slices = options.max_slice_nums if kind == "image" else VIDEO_SLICE_NUMS
    return f"{kind}:{options.downsample_mode}:{slices}:" + "|".join(digests)


def _encoder_outputs(images: list[torch.Tensor], videos: list[torch.Tensor]) -> dict:
    """The model's `mm_encoder_outputs` argument for features computed ahead (none: no argument)."""
    outputs = {kind: BaseModelOutputWithPooling(pooler_output=pooled)
               for kind, pooled in (("image", images), ("video", videos)) if pooled}
    return {"mm_encoder_outputs": outputs} if outputs else {}
