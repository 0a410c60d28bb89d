"""Where the GPU work happens: prefill, decode steps, joins and leaves of one family's text model.

Every family's runner (minicpmv4/runner.py, ...) is a `BatchedRunner`: the family encodes
conversations and says how a prompt's pictures enter its text model (`_prefill_inputs`); this base
runs the text model for the engine. A newcomer's prefill uses a transformers cache (`Batch`), then
joins the running rows, which live in preallocated slots (`SlotBatch`, slot_cache.py): a join
copies the prefill into a free slot, a leave frees one, and on CUDA the decode step is a captured
graph (graphs.py). ZeroGPU's one-call batches (no state survives its GPU call) stay in a `Batch`:
joined by concatenation, left by `index_select`.

Rows of different lengths are left-padded in a prefill; each row gets its own position ids and
attention mask so padding never leaks in. The model's layers may mix full attention (keys and
values that grow along time) with linear attention (a fixed-size state per row, MiniCPM-V 4.6):
joining and dropping handle both kinds.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

from ..system.lru import LruCache
from .graphs import capture_decode_graphs
from .slot_cache import SlotCache

log = logging.getLogger(__name__)

# Slot length when --max-model-len is auto and there is no memory budget (the CPU): long chats
# still fit, and the tiny model's 8 slots take a few MB.
CPU_MAX_MODEL_LEN = 8192
# Share of the memory budget the preallocated slots may take when --max-model-len is auto; the
# rest is for activations, the vision tower and its cache.
SLOT_BUDGET_SHARE = 0.5
# Shortest slot an auto size gives, even on a crowded GPU (an image prompt needs a few hundred).
MIN_MAX_MODEL_LEN = 1024


@dataclass
class PartialPrefill:
    """A long prompt being prefilled piece by piece: its ids and the cache of the part done."""

    prompt: Any
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


class BatchedRunner:
    """The text model's side of `model.runner.BatchRunner`; a family adds encoding and pictures."""

    def __init__(self, *, text_model, lm_head, text_layers, text_config, dtype: torch.dtype, device,
                 pad_token_id: int, capturable: bool = True) -> None:
        """`text_model(input_ids= or inputs_embeds=, attention_mask=, position_ids=, cache=,
        use_cache=)` returns the last hidden states and the cache; `lm_head` maps them to logits;
        `text_layers` are its decoder layers (each layer's slots go to that layer's device);
        `text_config` sizes the slots (its `layer_types` say which layers are linear attention);
        `capturable`: whether a decode step may be captured as a CUDA graph (not int8)."""
        self.text_model = text_model
        self.lm_head = lm_head
        self.text_config = text_config
        self.dtype = dtype
        self.device = torch.device(device)
        self.layer_devices = [_device_of(layer, self.device) for layer in text_layers]
        self.pad_token_id = pad_token_id
        self.capturable = capturable

    @property
    def devices(self) -> list[torch.device]:
        """Where the model takes its inputs and where its layers live."""
        return list(dict.fromkeys([self.device, *self.layer_devices]))

    # -- what a family provides ------------------------------------------------------------
    def _prefill_inputs(self, prompts: list[Any], input_ids: torch.Tensor, pads: list[int]) -> dict:
        """The text model's inputs for left-padded rows [B, W] (row i has `pads[i]` padding
        tokens first): the ids, plus whatever carries the prompts' pictures."""
        return {"input_ids": input_ids}

    def _piece_inputs(self, partial: PartialPrefill, start: int, input_ids: torch.Tensor) -> dict:
        """The inputs for `partial.ids[start:end]`, a piece that holds all of its pictures'
        placeholders when it reaches them."""
        return {"input_ids": input_ids}

    def _visual_span(self, ids: list[int]) -> tuple[int, int] | None:
        """[first, last + 1) of the prompt's picture placeholders, which a piece never splits."""
        return None

    def _step_mask(self, visible: torch.Tensor):
        """The decode step's attention mask from [B, W] visibility (a dict per layer kind for a
        model that mixes attention kinds)."""
        return _attention_mask(visible, self.text_config, self.dtype)

    # -- prefill ---------------------------------------------------------------------------
    @torch.inference_mode()
    def prefill(self, prompts: list[Any], generated: list[list[int]]) -> tuple[Batch, torch.Tensor]:
        """Prefill newcomers together; return their batch state and next-token logits [B, V].

        Rows are left-padded to the longest; each row's positions count only its own tokens, so
        a padded row computes what it would alone. `generated` continues rows that were
        preempted (out of memory).
        """
        rows = [self._row_ids(prompt, done) for prompt, done in zip(prompts, generated, strict=True)]
        width = max(len(ids) for ids in rows)
        pads = [width - len(ids) for ids in rows]
        input_ids = torch.tensor([[self.pad_token_id] * pad + ids for pad, ids in zip(pads, rows, strict=True)],
                                 device=self.device)
        mask = torch.tensor([[0] * pad + [1] * len(ids) for pad, ids in zip(pads, rows, strict=True)],
                            device=self.device)
        positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
        out = self.text_model(attention_mask=mask, position_ids=positions, use_cache=True,
                              **self._prefill_inputs(prompts, input_ids, pads))
        return Batch(cache=out.cache, mask=mask), self._logits(out)

    def begin_prefill(self, prompt: Any, generated: list[int]) -> PartialPrefill:
        """Start prefilling one long prompt a piece at a time (see `prefill_some`)."""
        ids = self._row_ids(prompt, generated)
        return PartialPrefill(prompt=prompt, ids=ids, images=self._visual_span(ids))

    @torch.inference_mode()
    def prefill_some(self, partial: PartialPrefill, tokens: int) -> tuple[Batch, torch.Tensor] | None:
        """Prefill the next `tokens` tokens of `partial` on top of what it holds; returns the batch
        and next-token logits (as `prefill` does) once the whole prompt is in, else None.

        The engine runs decode steps for the other rows between pieces, so one long prompt
        delays them by a piece's time, not by the whole prompt's. The pictures' placeholders are
        never split: the piece that reaches them takes them all, with their features.
        """
        start = partial.done
        end = min(start + tokens, len(partial.ids))
        if partial.images and start < partial.images[1] and end > partial.images[0]:
            end = max(end, partial.images[1])
        input_ids = torch.tensor([partial.ids[start:end]], device=self.device)
        mask = torch.ones((1, end), dtype=torch.long, device=self.device)
        positions = torch.arange(start, end, device=self.device)[None, :]
        out = self.text_model(attention_mask=mask, position_ids=positions, use_cache=True, cache=partial.cache,
                              **self._piece_inputs(partial, start, input_ids))
        partial.cache, partial.done = out.cache, end
        if end < len(partial.ids):
            return None
        return Batch(cache=out.cache, mask=mask), self._logits(out)

    @staticmethod
    def _row_ids(prompt: Any, generated: list[int]) -> list[int]:
        return prompt.ids.tolist() + generated

    def _logits(self, out) -> torch.Tensor:
        return self.lm_head(out.last_hidden_state[:, -1, :]).float()

    # -- decode steps ----------------------------------------------------------------------
    @torch.inference_mode()
    def step(self, batch: Batch | SlotBatch, tokens: torch.Tensor) -> torch.Tensor:
        """Feed each row its last token; returns next-token logits [B, V]. Updates `batch`."""
        if isinstance(batch, SlotBatch):
            return self._slot_step(batch, tokens)
        batch.mask = torch.cat([batch.mask, batch.mask.new_ones((batch.size, 1))], dim=1)
        positions = batch.mask.sum(dim=1, keepdim=True) - 1
        out = self.text_model(input_ids=tokens.to(self.device)[:, None], cache=batch.cache,
                              attention_mask=batch.mask, position_ids=positions, use_cache=True)
        return self._logits(out)

    def _slot_step(self, batch: SlotBatch, tokens: torch.Tensor) -> torch.Tensor:
        """One decode step over slots `0..size-1`: a captured graph when one fits, else eager."""
        size, width = batch.size, max(batch.lengths) + 1
        if batch.graphs is not None and batch.graphs.fits(size, width):
            logits = batch.graphs.run(tokens, size, width)
        else:
            logits = self.decode_slots(batch.cache, tokens.to(self.device), size, width)
        batch.cache.advance(size)
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
        out = self.text_model(input_ids=tokens[:, None], cache=cache, attention_mask=self._step_mask(visible),
                              position_ids=lengths[:, None], use_cache=True)
        return self._logits(out)

    # -- slots -----------------------------------------------------------------------------
    def new_slots(self, slots: int, max_len: int, capture: bool = True) -> SlotBatch:
        """Preallocate `slots` rows of `max_len` tokens (see `slot_length` for the size), and
        capture the decode steps as CUDA graphs when `capture` and the device allow."""
        cache = SlotCache(self.text_config, slots, max_len, self.dtype, self.device, self.layer_devices)
        batch = SlotBatch(cache=cache, lengths=[])
        log.info("preallocated %d slots of %d tokens: %.0f MB", slots, max_len, self.slot_bytes(slots, max_len) / 2**20)
        if capture:
            batch.graphs = capture_decode_graphs(self, cache)
        return batch

    def slot_bytes(self, slots: int, max_len: int) -> int:
        return SlotCache.bytes_needed(self.text_config, slots, max_len, self.dtype)

    def slot_length(self, slots: int, requested: int, budget_bytes: int | None) -> int:
        """Tokens one slot holds: `requested` (--max-model-len) if set, else what a share of the
        memory budget allows for `slots` rows; never past the model's context window."""
        if requested:
            return min(requested, self.context_length)
        if budget_bytes is None:
            return min(self.context_length, CPU_MAX_MODEL_LEN)
        fixed = SlotCache.bytes_needed(self.text_config, 1, 0, self.dtype)
        per_token = SlotCache.bytes_needed(self.text_config, 1, 1, self.dtype) - fixed
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

    # -- joins and leaves --------------------------------------------------------------------
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

    # -- memory, for admission -------------------------------------------------------------
    def prefill_bytes(self, rows: int, width: int) -> int:
        """About the most memory a prefill of `rows` rows padded to `width` tokens takes at once:
        one layer's activations (the hidden state a few times over, the MLP's gate and up
        projections), the newcomers' cache until it is copied into slots, and the logits."""
        config = self.text_config
        element = torch.finfo(self.dtype).bits // 8 if self.dtype.is_floating_point else 2
        activations = element * (4 * config.hidden_size + 3 * config.intermediate_size)
        cache = SlotCache.bytes_needed(config, rows, width, self.dtype)
        return rows * width * activations + cache + rows * config.vocab_size * 4 * 2

    def working_bytes(self, max_batch: int) -> int:
        """Memory the runner may still take beside slots and prefills: the sampler's [B, V]
        temporaries (probabilities, a sorted copy for top-p) and the room the family's caches on
        the GPU (vision features) may still fill."""
        room = sum(max(0, cache.capacity - cache.total) for cache in self._device_caches())
        return max_batch * self.text_config.vocab_size * 4 * 4 + room

    def _device_caches(self) -> list[LruCache]:
        """The family's byte-bounded caches that live on the GPU."""
        return []


def _device_of(module: torch.nn.Module, default: torch.device) -> torch.device:
    """Where a layer's weights live (with `--device-map auto`, layers may sit on several GPUs)."""
    parameter = next(module.parameters(), None)
    return parameter.device if parameter is not None else default


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
