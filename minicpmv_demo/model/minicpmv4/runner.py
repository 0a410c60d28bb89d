"""The only code that runs a native transformers MiniCPM-V 4.x model, one decode step at a time.

The engine decides *which* requests run together; this runner executes that decision:
encode a conversation, prefill newcomers, join them to the running batch, run one decode step
for every row, and drop rows that left. MiniCPM-V 4.6's text model mixes full-attention layers
(a key/value cache that grows along time) with linear-attention layers (a fixed-size state per
row), so joining and dropping handle both kinds.

The running rows live in preallocated slots (`SlotBatch`, slot_cache.py): a join copies the
newcomer's prefill into a free slot, a leave frees one, and on CUDA the decode step is a
captured graph (graphs.py). A newcomer's prefill, and ZeroGPU's whole batch (no state survives
its GPU call), use one transformers cache instead (`Batch`): joined by concatenation, left by
`index_select`.

The vision tower reads images NaViT-packed for one sample at a time, so it runs per prompt (and
its output is cached per set of images and settings); the text model then prefills all newcomers
at once. Each prompt brings its own visual settings (`PromptOptions.downsample_mode`,
`max_slice_nums`): they shape its placeholders and its pass through the vision tower, so rows with
different settings still share one batch. A video is read as frames through the processor's
video path and scattered over its own placeholder token, beside any pictures.
Rows of different lengths are left-padded; each row gets its own position ids and attention mask
so padding never leaks in."""

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
from ..graphs import capture_decode_graphs
from ..slot_cache import SlotCache

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
# Slot length when --max-model-len is auto and there is no memory budget (the CPU): long chats
# still fit, and the tiny model's 8 slots take a few MB.
CPU_MAX_MODEL_LEN = 8192
# Share of the memory budget the preallocated slots may take when --max-model-len is auto; the
# rest is for activations, the vision tower and its cache.
SLOT_BUDGET_SHARE = 0.5
# Shortest slot an auto size gives, even on a crowded GPU (an image prompt needs a few hundred).
MIN_MAX_MODEL_LEN = 1024


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


@dataclass
class PartialPrefill:
    """A long prompt being prefilled piece by piece: its ids and the cache of the part done."""

    prompt: Prompt
    ids: list[int]
    images: tuple[int, int] | None  # [first, last + 1) of the visual placeholders: never split
    done: int = 0
    cache: object = None


@dataclass
class Batch:
    """The running rows' shared state: transformers cache, attention mask [B, T]."""

    cache: object
    mask: torch.Tensor

    @property
    def size(self) -> int:
        return int(self.mask.shape[0])


@dataclass
class SlotBatch:
    """The running rows in preallocated slots: row i lives in slot i (see slot_cache.py).

    `lengths` mirrors `cache.lengths` on the host, so sizing a step never waits for the device.
    """

    cache: SlotCache
    lengths: list[int]
    graphs: object = None  # captured decode steps (model/graphs.py), or None: eager

    @property
    def size(self) -> int:
        return len(self.lengths)


class NativeRunner:
    """Runs `AutoModelForImageTextToText` MiniCPM-V 4.x checkpoints for the engine."""

    supports_batching = True
    reads_video = True  # through the processor's video path (MiniCPM-V 4.6 and later)

    def __init__(self, model, processor, thinks_by_default: bool = False) -> None:
        """`thinks_by_default`: what a request that does not choose gets (a Thinking checkpoint
        thinks, an Instruct one answers straight away; see loading.py)."""
        self.model = model
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.thinks_by_default = thinks_by_default
        self.reasoning_tags = reasoning_tags(self.tokenizer)
        # Templates with Qwen3.5's switch get it on every request, never their own default (4.6
        # Instruct's template thinks unless told not to); others are not handed a stray variable.
        self._template_switches_thinking = "enable_thinking" in (processor.chat_template or "")
        self.device = model.device
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

    # -- model work (engine thread only) ---------------------------------------------------
    @torch.inference_mode()
    def prefill(self, prompts: list[Prompt], generated: list[list[int]]) -> tuple[Batch, torch.Tensor]:
        """Prefill newcomers together; return their batch state and next-token logits [B, V].

        Rows are left-padded to the longest; each row's positions count only its own tokens, so
        a padded row computes what it would alone. Images go through the vision tower one
        prompt at a time (it packs one sample's images) and their features are scattered into
        the batch in row order. `generated` continues rows that were preempted (out of memory).
        """
        rows = [self._row_ids(prompt, done) for prompt, done in zip(prompts, generated, strict=True)]
        width = max(len(ids) for ids in rows)
        pad = self.tokenizer.pad_token_id or 0
        input_ids = torch.tensor([[pad] * (width - len(ids)) + ids for ids in rows], device=self.device)
        mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in rows], device=self.device)
        positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
        extra = _encoder_outputs([part for prompt in prompts for part in self._visual_features(prompt, "image")],
                                 [part for prompt in prompts for part in self._visual_features(prompt, "video")])
        out = self.model.model(input_ids=input_ids, attention_mask=mask, position_ids=positions, use_cache=True,
                               **extra)
        logits = self.model.lm_head(out.last_hidden_state[:, -1, :]).float()
        return Batch(cache=out.cache, mask=mask), logits

    def begin_prefill(self, prompt: Prompt, generated: list[int]) -> PartialPrefill:
        """Start prefilling one long prompt a piece at a time (see `prefill_some`)."""
        ids = self._row_ids(prompt, generated)
        visual = {self.model.config.image_token_id, self.model.config.video_token_id}
        image_at = [i for i, token in enumerate(ids) if token in visual]
        return PartialPrefill(prompt=prompt, ids=ids, images=(image_at[0], image_at[-1] + 1) if image_at else None)

    @torch.inference_mode()
    def prefill_some(self, partial: PartialPrefill, tokens: int) -> tuple[Batch, torch.Tensor] | None:
        """Prefill the next `tokens` tokens of `partial` on top of what it holds; returns the batch
        and next-token logits (as `prefill` does) once the whole prompt is in, else None.

        The engine runs decode steps for the other rows between pieces, so one long prompt
        delays them by a piece's time, not by the whole prompt's. The pictures' placeholders are
        never split: the piece that reaches them takes them all (pictures and videos), with their
        features.
        """
        start = partial.done
        end = min(start + tokens, len(partial.ids))
        extra = {}
        if partial.images and start < partial.images[1] and end > partial.images[0]:
            end = max(end, partial.images[1])
            extra = _encoder_outputs(self._visual_features(partial.prompt, "image"),
                                     self._visual_features(partial.prompt, "video"))
        input_ids = torch.tensor([partial.ids[start:end]], device=self.device)
        mask = torch.ones((1, end), dtype=torch.long, device=self.device)
        positions = torch.arange(start, end, device=self.device)[None, :]
        out = self.model.model(input_ids=input_ids, attention_mask=mask, position_ids=positions, use_cache=True,
                               cache=partial.cache, **extra)
        partial.cache, partial.done = out.cache, end
        if end < len(partial.ids):
            return None
        logits = self.model.lm_head(out.last_hidden_state[:, -1, :]).float()
        return Batch(cache=out.cache, mask=mask), logits

    @staticmethod
    def _row_ids(prompt: Prompt, generated: list[int]) -> list[int]:
        return prompt.inputs["input_ids"][0].tolist() + generated

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

    @torch.inference_mode()
    def step(self, batch: Batch | SlotBatch, tokens: torch.Tensor) -> torch.Tensor:
        """Feed each row its last token; returns next-token logits [B, V]. Updates `batch`."""
        if isinstance(batch, SlotBatch):
            return self._slot_step(batch, tokens)
        batch.mask = torch.cat([batch.mask, batch.mask.new_ones((batch.size, 1))], dim=1)
        positions = batch.mask.sum(dim=1, keepdim=True) - 1
        out = self.model.model(input_ids=tokens.to(self.device)[:, None], cache=batch.cache,
                               attention_mask=batch.mask, position_ids=positions, use_cache=True)
        return self.model.lm_head(out.last_hidden_state[:, -1, :]).float()

    def _slot_step(self, batch: SlotBatch, tokens: torch.Tensor) -> torch.Tensor:
        """One decode step over slots `0..size-1`: a captured graph when one fits, else eager."""
        size, width = batch.size, max(batch.lengths) + 1
        if batch.graphs is not None and batch.graphs.fits(size, width):
            logits = batch.graphs.run(tokens, size)
        else:
            logits = self.decode_slots(batch.cache, tokens.to(self.device), size, width)
        batch.cache.lengths[:size] += 1
        batch.lengths = [length + 1 for length in batch.lengths]
        return logits

    @torch.inference_mode()
    def decode_slots(self, cache: SlotCache, tokens: torch.Tensor, size: int, width: int) -> torch.Tensor:
        """The decode step itself, on device tensors only (no host sync): what a graph captures.

        Row i reads columns `0..width-1` of slot i, of which its own `lengths[i]` and the new one.
        """
        cache.activate(size, width)
        lengths = cache.lengths[:size]
        visible = torch.arange(width, device=lengths.device)[None, :] <= lengths[:, None]
        masks = {"full_attention": _attention_mask(visible, self.model.config, self.model.dtype),
                 "linear_attention": None}  # a one-token step is never padding
        out = self.model.model(input_ids=tokens[:, None], cache=cache, attention_mask=masks,
                               position_ids=lengths[:, None], use_cache=True)
        return self.model.lm_head(out.last_hidden_state[:, -1, :]).float()

    def new_slots(self, slots: int, max_len: int, capture: bool = True) -> SlotBatch:
        """Preallocate `slots` rows of `max_len` tokens (see `slot_length` for the size), and
        capture the decode steps as CUDA graphs when `capture` and the device allow."""
        cache = SlotCache(self.model.config.text_config, slots, max_len, self.model.dtype, self.device)
        batch = SlotBatch(cache=cache, lengths=[])
        log.info("preallocated %d slots of %d tokens: %.0f MB", slots, max_len,
                 SlotCache.bytes_needed(self.model.config.text_config, slots, max_len, self.model.dtype) / 2**20)
        if capture:
            batch.graphs = capture_decode_graphs(self, cache)
        return batch

    def slot_length(self, slots: int, requested: int, budget_bytes: int | None) -> int:
        """Tokens one slot holds: `requested` (--max-model-len) if set, else what a share of the
        memory budget allows for `slots` rows; never past the model's context window."""
        if requested:
            return min(requested, self.context_length)
        if budget_bytes is None:
            return min(self.context_length, CPU_MAX_MODEL_LEN)
        config = self.model.config.text_config
        fixed = SlotCache.bytes_needed(config, 1, 0, self.model.dtype)
        per_token = SlotCache.bytes_needed(config, 1, 1, self.model.dtype) - fixed
        share = int(budget_bytes * SLOT_BUDGET_SHARE) // slots - fixed
        return min(self.context_length, max(MIN_MAX_MODEL_LEN, share // max(per_token, 1)))

    def empty(self, batch: Batch | SlotBatch | None) -> SlotBatch | None:
        """Drop every row (after a failure): slots are cleared and kept, a dynamic batch goes."""
        if not isinstance(batch, SlotBatch):
            return None
        for slot, length in enumerate(batch.lengths):
            batch.cache.free(slot, length)
        batch.lengths = []
        return batch

    def merge(self, batch: Batch | SlotBatch | None, newcomer: Batch) -> Batch | SlotBatch:
        """Append `newcomer`'s rows to `batch`: into free slots, or (dynamic) concatenated with
        the shorter one left-padded on the time axis."""
        if isinstance(batch, SlotBatch):
            if batch.size + newcomer.size > batch.cache.slots:  # checked before any row is written
                raise RuntimeError("no free slot: the engine admitted more rows than --max-batch")
            for row, length in enumerate(newcomer.mask.sum(dim=1).tolist()):
                batch.cache.write(batch.size, newcomer.cache, row, length)
                batch.lengths.append(length)
            return batch
        if batch is None:
            return newcomer
        width = max(batch.mask.shape[1], newcomer.mask.shape[1])
        for old_layer, new_layer in zip(batch.cache.layers, newcomer.cache.layers, strict=True):
            if _has_kv(old_layer):
                old_layer.keys = torch.cat([_pad_time(old_layer.keys, width), _pad_time(new_layer.keys, width)])
                old_layer.values = torch.cat([_pad_time(old_layer.values, width),
                                              _pad_time(new_layer.values, width)])
            if _has_linear_state(old_layer):
                for states in ("conv_states", "recurrent_states"):
                    old, new = getattr(old_layer, states), getattr(new_layer, states)
                    for index in old:
                        old[index] = torch.cat([old[index], new[index]])
        batch.mask = torch.cat([_pad_mask(batch.mask, width), _pad_mask(newcomer.mask, width)])
        return batch

    def select(self, batch: Batch | SlotBatch, keep: list[int]) -> Batch | SlotBatch | None:
        """Keep only rows `keep` (in that order).

        Slots: `keep[p] >= p` must hold (the engine fills a hole with a later row), so each
        kept row either stays put or moves into a slot already freed; only moved rows are copied.
        Dynamic: index every layer and trim time columns that are now padding for all rows.
        """
        if isinstance(batch, SlotBatch):
            return self._select_slots(batch, keep)
        if not keep:
            return None
        index = torch.tensor(keep, device=batch.mask.device)
        mask = batch.mask.index_select(0, index)
        real_columns = mask.any(dim=0).nonzero()
        start = int(real_columns[0]) if len(real_columns) else 0
        for layer in batch.cache.layers:
            if _has_kv(layer):
                layer.keys = layer.keys.index_select(0, index.to(layer.keys.device))[:, :, start:]
                layer.values = layer.values.index_select(0, index.to(layer.values.device))[:, :, start:]
            if _has_linear_state(layer):
                for states in (layer.conv_states, layer.recurrent_states):
                    for key, tensor in states.items():
                        states[key] = tensor.index_select(0, index.to(tensor.device))
        batch.mask = mask[:, start:]
        return batch

    @staticmethod
    def _select_slots(batch: SlotBatch, keep: list[int]) -> SlotBatch:
        if any(source < target for target, source in enumerate(keep)):
            raise ValueError(f"slot rows can only move down: {keep}")
        kept = set(keep)
        for slot, length in enumerate(batch.lengths):
            if slot not in kept:
                batch.cache.free(slot, length)
        for target, source in enumerate(keep):
            if source != target:
                batch.cache.move(source, target, batch.lengths[source])
        batch.lengths = [batch.lengths[source] for source in keep]
        return batch

    # -- sizes, for memory-aware admission ---------------------------------------------------
    def cache_bytes(self, tokens: int) -> int:
        """Estimated cache bytes of one row holding `tokens` tokens (both layer kinds)."""
        config = self.model.config.text_config
        element = torch.finfo(self.model.dtype).bits // 8 if self.model.dtype.is_floating_point else 2
        layer_types = getattr(config, "layer_types", None) or ["full_attention"] * config.num_hidden_layers
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        per_token = sum(2 * config.num_key_value_heads * head_dim * element
                        for kind in layer_types if kind != "linear_attention")
        fixed = 0
        if "linear_attention" in layer_types:
            key_dim = config.linear_num_key_heads * config.linear_key_head_dim
            value_dim = config.linear_num_value_heads * config.linear_value_head_dim
            conv = (2 * key_dim + value_dim) * config.linear_conv_kernel_dim * element
            recurrent = config.linear_num_value_heads * config.linear_key_head_dim * config.linear_value_head_dim * 4
            fixed = (conv + recurrent) * layer_types.count("linear_attention")
        return tokens * per_token + fixed


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


def _attention_mask(visible: torch.Tensor, config, dtype: torch.dtype) -> torch.Tensor:
    """[B, W] visibility as the 4-D mask the attention kernels take: additive for eager, bool otherwise."""
    mask = visible[:, None, None, :]
    if getattr(config, "_attn_implementation", "sdpa") == "eager":
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)
    return mask


def _has_kv(layer) -> bool:
    return getattr(layer, "keys", None) is not None


def _has_linear_state(layer) -> bool:
    return bool(getattr(layer, "conv_states", None))


def _pad_time(tensor: torch.Tensor, width: int) -> torch.Tensor:
    """Left-pad a [B, H, T, D] key/value tensor with zeros up to `width` time steps."""
    missing = width - tensor.shape[2]
    return torch.nn.functional.pad(tensor, (0, 0, missing, 0)) if missing else tensor


def _pad_mask(mask: torch.Tensor, width: int) -> torch.Tensor:
    missing = width - mask.shape[1]
    return torch.nn.functional.pad(mask, (missing, 0)) if missing else mask
