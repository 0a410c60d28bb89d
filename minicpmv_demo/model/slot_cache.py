"""Preallocated per-slot cache: every running row owns one slot of fixed-size buffers.

Rebuilding every layer's cache on each join and leave (concatenating, `index_select`) costs
time proportional to the whole batch and gives tensors whose shapes change every step, which a
captured CUDA graph cannot take. Here the full-attention keys/values are `[slots, kv_heads,
max_len, head_dim]` and the linear-attention conv/recurrent states `[slots, ...]`, allocated
once. A newcomer's prefill is copied into a free slot; a leaving row frees its slot; running
rows stay packed in slots `0..n-1`, so a decode step reads plain leading slices (views, no copy)
and a leave moves at most one row (the engine fills the hole with its last row).

Each row's tokens sit at columns `0..length-1` of its slot (right-padded, masked beyond), so a
row's position is its own length and every row writes its next key at its own column.
transformers' `StaticCache` writes one shared column for the whole batch (`cache_position`)
and so cannot hold rows of different lengths that join at different times: the full-attention
layers are our own; the linear-attention layers are transformers' `LinearAttentionLayer`, which
already updates its states in place, here pointed at views of the slot buffers.

Invariant: columns at or past a slot's length hold zeros (or, for free slots, one column of a
captured graph's padding row). Masked columns get zero weight, but a NaN left by a failed row
would still poison `0 * NaN`, so a freed slot is cleared, including the column a step that failed
half-way (out of memory) may have written past the slot's length.

A model spread over several GPUs (`--device-map auto`) keeps each layer's buffers on that layer's
device; the columns each row writes at (`lengths`) are mirrored on every device the layers use.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, LinearAttentionLayer


class SlotKVLayer:
    """One full-attention layer's keys/values for all slots; writes each row at its own column."""

    record_past = False

    def __init__(self, owner: SlotCache, keys: torch.Tensor, values: torch.Tensor) -> None:
        self.owner = owner
        self.keys_buffer, self.values_buffer = keys, values

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Write the step's key/value of row i at column `columns[i]`; return the attended window."""
        rows, columns = self.owner.step_index[self.keys_buffer.device]
        self.keys_buffer[rows, :, columns] = key_states[:, :, 0]
        self.values_buffer[rows, :, columns] = value_states[:, :, 0]
        batch, width = key_states.shape[0], self.owner.width
        return self.keys_buffer[:batch, :, :width], self.values_buffer[:batch, :, :width]


class SlotCache(Cache):
    """The buffers of `slots` rows of up to `max_len` tokens, shaped as the model's layers need.

    `activate(batch, width)` points the layers at the first `batch` slots before a decode step;
    `step_index[device]` (device tensors: the slot numbers and a view of `lengths` there) says
    where each row writes.
    """

    def __init__(self, text_config, slots: int, max_len: int, dtype: torch.dtype, device,
                 layer_devices: list | None = None) -> None:
        """`device`: where the model takes its inputs (positions and masks are built there);
        `layer_devices`: each layer's device (default: all on `device`)."""
        self.slots, self.max_len = slots, max_len
        config = text_config
        kinds = getattr(config, "layer_types", None) or ["full_attention"] * config.num_hidden_layers
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.device = torch.device(device)
        self.layer_devices = [torch.device(d) for d in layer_devices] if layer_devices else [self.device] * len(kinds)
        # Real tokens per slot, on the input device (`lengths`) and mirrored where layers live.
        self.lengths = torch.zeros(slots, dtype=torch.long, device=self.device)
        self._lengths_on = {self.device: self.lengths}
        for other in set(self.layer_devices) - {self.device}:
            self._lengths_on[other] = torch.zeros(slots, dtype=torch.long, device=other)
        self._slot_index_on = {d: torch.arange(slots, device=d) for d in self._lengths_on}
        self.step_index = {d: (self._slot_index_on[d], self._lengths_on[d]) for d in self._lengths_on}
        self.width = 1
        self._active = -1
        layers: list = []
        self.conv_buffers: dict[int, torch.Tensor] = {}
        self.recurrent_buffers: dict[int, torch.Tensor] = {}
        for index, (kind, device) in enumerate(zip(kinds, self.layer_devices, strict=True)):
            if kind == "linear_attention":
                key_dim = config.linear_num_key_heads * config.linear_key_head_dim
                value_dim = config.linear_num_value_heads * config.linear_value_head_dim
                conv = torch.zeros(slots, 2 * key_dim + value_dim, config.linear_conv_kernel_dim,
                                   dtype=dtype, device=device)
                # The delta rule keeps its state in float32 whatever the model's dtype.
                recurrent = torch.zeros(slots, config.linear_num_value_heads, config.linear_key_head_dim,
                                        config.linear_value_head_dim, dtype=torch.float32, device=device)
                self.conv_buffers[index], self.recurrent_buffers[index] = conv, recurrent
                layer = LinearAttentionLayer()
                layer.conv_kernel_size[0] = config.linear_conv_kernel_dim
                layer.is_conv_states_initialized[0] = layer.is_recurrent_states_initialized[0] = True
                layer.has_previous_state[0] = True
                layer.dtype, layer.device = dtype, torch.device(device)
                layers.append(layer)
            else:
                shape = (slots, config.num_key_value_heads, max_len, head_dim)
                layers.append(SlotKVLayer(self, torch.zeros(shape, dtype=dtype, device=device),
                                          torch.zeros(shape, dtype=dtype, device=device)))
        super().__init__(layers=layers)

    @property
    def spread(self) -> bool:
        """Whether the layers live on more than one device (such a step is not captured)."""
        return len(self._lengths_on) > 1

    def set_length(self, slot: int, length: int) -> None:
        for lengths in self._lengths_on.values():
            lengths[slot] = length

    def advance(self, rows: int) -> None:
        """After a decode step: the first `rows` slots hold one more token each."""
        for lengths in self._lengths_on.values():
            lengths[:rows] += 1

    @staticmethod
    def bytes_needed(text_config, slots: int, max_len: int, dtype: torch.dtype) -> int:
        """What `SlotCache(text_config, slots, max_len, dtype, ...)` allocates, without allocating it."""
        cache = torch.device("meta")
        probe = SlotCache(text_config, 1, 1, dtype, cache)
        per_token = sum(layer.keys_buffer.element_size() * layer.keys_buffer[0, :, 0].numel() * 2
                        for layer in probe.layers if isinstance(layer, SlotKVLayer))
        fixed = sum(t.element_size() * t[0].numel()
                    for t in (*probe.conv_buffers.values(), *probe.recurrent_buffers.values()))
        return slots * (max_len * per_token + fixed)

    # -- the decode step -------------------------------------------------------------------
    def activate(self, batch: int, width: int) -> None:
        """Point every layer at slots `0..batch-1` and attend over the first `width` columns."""
        self.width = width
        if batch == self._active:
            return
        self._active = batch
        self.step_index = {device: (self._slot_index_on[device][:batch], lengths[:batch])
                           for device, lengths in self._lengths_on.items()}
        for index, layer in enumerate(self.layers):
            if index in self.conv_buffers:
                layer.conv_states[0] = self.conv_buffers[index][:batch]
                layer.recurrent_states[0] = self.recurrent_buffers[index][:batch]

    # -- joins and leaves ------------------------------------------------------------------
    def write(self, slot: int, prefilled, row: int, length: int) -> None:
        """Copy row `row` of a prefill's cache (its last `length` columns: rows are left-padded)
        into the free `slot`."""
        for index, (mine, theirs) in enumerate(zip(self.layers, prefilled.layers, strict=True)):
            if index in self.conv_buffers:
                self.conv_buffers[index][slot].copy_(theirs.conv_states[0][row])
                self.recurrent_buffers[index][slot].copy_(theirs.recurrent_states[0][row])
            else:
                start = theirs.keys.shape[2] - length
                mine.keys_buffer[slot, :, :length].copy_(theirs.keys[row, :, start:])
                mine.values_buffer[slot, :, :length].copy_(theirs.values[row, :, start:])
        self.set_length(slot, length)

    def move(self, source: int, target: int, length: int) -> None:
        """Move the row in `source` (holding `length` tokens) into the free `target`; free `source`."""
        for index, layer in enumerate(self.layers):
            if index in self.conv_buffers:
                self.conv_buffers[index][target].copy_(self.conv_buffers[index][source])
                self.recurrent_buffers[index][target].copy_(self.recurrent_buffers[index][source])
            else:
                layer.keys_buffer[target, :, :length].copy_(layer.keys_buffer[source, :, :length])
                layer.values_buffer[target, :, :length].copy_(layer.values_buffer[source, :, :length])
        self.set_length(target, length)
        self.free(source, length)

    def free(self, slot: int, length: int) -> None:
        """Clear the `length` columns `slot` used, and the next one: a step that failed half-way
        may have written it, and graph padding writes column 0 of a free slot."""
        used = min(length + 1, self.max_len)
        for index, layer in enumerate(self.layers):
            if index in self.conv_buffers:
                self.conv_buffers[index][slot].zero_()
                self.recurrent_buffers[index][slot].zero_()
            else:
                layer.keys_buffer[slot, :, :used].zero_()
                layer.values_buffer[slot, :, :used].zero_()
        self.set_length(slot, 0)
