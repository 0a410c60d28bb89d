"""The resampler of MiniCPM-V 2.5 / 2.6: one cross-attention from learned queries to a slice's patches.

Each picture slice arrives as a grid of `h x w` vision-tower outputs. A fixed set of `query_num`
learned queries attends over them (keys carry a 2-D sine-cosine position table cut to the slice's
own grid), so every slice becomes exactly `query_num` embeddings of the language model's width,
whatever its shape. This matches `resampler.py: Resampler` of the 2.5 release (`adaptive=True`,
the same class in 2.6) operation by operation, including the way `torch.nn.MultiheadAttention`
computes when it is given padded keys and asked for its weights: the same linear maps, the same
scaling of the queries before the product, the same additive -inf padding mask, so float results
match the release's bit for bit on the same device.

The position table is a non-persistent buffer (not in the checkpoint, as in the release). The
model's `_init_weights` fills it, which transformers runs after `from_pretrained` for every module
holding such a buffer; a slice bigger than the table grows it, as the release does.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

# The release's initial table: 70 x 70 patches (980 px at patch 14), grown on demand.
INITIAL_GRID = (70, 70)
LAYER_NORM_EPS = 1e-6


def sincos_position_table(embed_dim: int, height: int, width: int) -> np.ndarray:
    """The 2-D sine-cosine table [height, width, embed_dim] (float32), as the release builds it.

    The first half of each vector encodes the column (x) and the second half the row (y); each
    half is [sin(p * f), cos(p * f)] over frequencies f_k = 1 / 10000^(k / (embed_dim / 4)).
    Computed in numpy float32 in the same order as `resampler.py: get_2d_sincos_pos_embed` of the
    2.5 release, so the values are the same to the last bit.
    """
    if embed_dim % 4:
        raise ValueError(f"the position table needs a width divisible by 4, not {embed_dim}")
    quarter = embed_dim // 4
    exponents = np.arange(quarter, dtype=np.float32)
    exponents /= quarter
    frequencies = 1.0 / 10000**exponents
    columns, rows = np.meshgrid(np.arange(width, dtype=np.float32), np.arange(height, dtype=np.float32))
    halves = []
    for coordinate in (columns, rows):
        angles = np.einsum("hw,d->hwd", coordinate, frequencies)
        halves.append(np.concatenate([np.sin(angles), np.cos(angles)], axis=-1))
    return np.concatenate(halves, axis=-1)


class ResamplerAttention(nn.Module):
    """Multi-head cross-attention holding its weights under `torch.nn.MultiheadAttention`'s names
    (`in_proj_weight`, `in_proj_bias`, `out_proj`), which are the checkpoint's names.

    Inputs are sequence-first ([length, batch, width]), as the release calls it.
    """

    def __init__(self, embed_dim: int, num_heads: int) -> None:
        super().__init__()
        if num_heads < 1 or embed_dim % num_heads:
            raise ValueError(f"{embed_dim} wide attention cannot have {num_heads} heads")
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * embed_dim, embed_dim))
        self.in_proj_bias = nn.Parameter(torch.empty(3 * embed_dim))
        self.out_proj = nn.Linear(embed_dim, embed_dim)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                key_padding_mask: torch.Tensor) -> torch.Tensor:
        """query [Q, B, E], key/value [L, B, E], key_padding_mask [B, L] (True: padding) -> [Q, B, E]."""
        q_weight, k_weight, v_weight = self.in_proj_weight.chunk(3)
        q_bias, k_bias, v_bias = self.in_proj_bias.chunk(3)
        q = F.linear(query, q_weight, q_bias)
        k = F.linear(key, k_weight, k_bias)
        v = F.linear(value, v_weight, v_bias)
        queries, batch, width = q.shape
        keys = k.shape[0]
        heads, head_dim = self.num_heads, width // self.num_heads
        q = q.view(queries, batch * heads, head_dim).transpose(0, 1)
        k = k.view(keys, batch * heads, head_dim).transpose(0, 1)
        v = v.view(keys, batch * heads, head_dim).transpose(0, 1)
        mask = torch.zeros(key_padding_mask.shape, dtype=q.dtype, device=q.device)
        mask = mask.masked_fill_(key_padding_mask, float("-inf"))
        mask = mask.view(batch, 1, 1, keys).expand(-1, heads, -1, -1).reshape(batch * heads, 1, keys)
        scores = torch.baddbmm(mask, q / math.sqrt(head_dim), k.transpose(-2, -1))
        out = torch.bmm(F.softmax(scores, dim=-1), v)
        out = out.transpose(0, 1).contiguous().view(queries * batch, width)
        return self.out_proj(out).view(queries, batch, width)


class Resampler(nn.Module):
    """Perceiver-style resampler: [slices, patches, vision width] -> [slices, query_num, embed_dim].

    Weight names as in the checkpoint: `query`, `kv_proj`, `attn.*`, `ln_q`, `ln_kv`, `ln_post`,
    `proj`. The release gives it `embed_dim // 128` heads.
    """

    def __init__(self, num_queries: int, embed_dim: int, num_heads: int, kv_dim: int) -> None:
        super().__init__()
        self.num_queries = num_queries
        self.embed_dim = embed_dim
        self.query = nn.Parameter(torch.zeros(num_queries, embed_dim))
        self.kv_proj = nn.Linear(kv_dim, embed_dim, bias=False) if kv_dim != embed_dim else nn.Identity()
        self.attn = ResamplerAttention(embed_dim, num_heads)
        self.ln_q = nn.LayerNorm(embed_dim, eps=LAYER_NORM_EPS)
        self.ln_kv = nn.LayerNorm(embed_dim, eps=LAYER_NORM_EPS)
        self.ln_post = nn.LayerNorm(embed_dim, eps=LAYER_NORM_EPS)
        self.proj = nn.Parameter(torch.empty(embed_dim, embed_dim))
        self.register_buffer("pos_embed", self.position_table(INITIAL_GRID), persistent=False)

    def position_table(self, grid: tuple[int, int]) -> torch.Tensor:
        """The float32 position table for a `grid` = (rows, columns) of patches."""
        return torch.from_numpy(sincos_position_table(self.embed_dim, *grid))

    @property
    def dtype(self) -> torch.dtype:
        """The dtype it computes in (`query` is never quantized)."""
        return self.query.dtype

    def _fit_table(self, tgt_sizes: torch.Tensor) -> None:
        """Grow the table when a slice has more rows or columns than it covers."""
        rows, columns = (int(value) for value in tgt_sizes.max(dim=0).values)
        have_rows, have_columns = self.pos_embed.shape[:2]
        if rows > have_rows or columns > have_columns:
            table = self.position_table((max(rows, have_rows), max(columns, have_columns)))
            self.pos_embed = table.to(self.pos_embed.device)

    def forward(self, x: torch.Tensor, tgt_sizes: torch.Tensor) -> torch.Tensor:
        """x [B, L, kv_dim] (slice b's first h*w rows are its patches, the rest padding),
        tgt_sizes [B, 2] = (h, w) per slice -> [B, num_queries, embed_dim]."""
        if x.shape[0] != tgt_sizes.shape[0]:
            raise ValueError(f"{x.shape[0]} slices but {tgt_sizes.shape[0]} sizes")
        batch, dtype, device = x.shape[0], x.dtype, x.device
        self._fit_table(tgt_sizes)
        sizes = tgt_sizes.tolist()
        lengths = [rows * columns for rows, columns in sizes]
        longest = max(lengths)
        padding = torch.arange(longest, device=device)[None, :] >= torch.tensor(lengths, device=device)[:, None]
        positions = [self.pos_embed[:rows, :columns, :].reshape(rows * columns, -1).to(device, dtype)
                     for rows, columns in sizes]
        positions = nn.utils.rnn.pad_sequence(positions, batch_first=True, padding_value=0.0).permute(1, 0, 2)
        x = self.ln_kv(self.kv_proj(x)).permute(1, 0, 2)  # [L, B, E]
        queries = self.ln_q(self.query).unsqueeze(1).repeat(1, batch, 1)  # [Q, B, E]
        out = self.attn(queries, x + positions, x, key_padding_mask=padding)
        return self.ln_post(out.permute(1, 0, 2)) @ self.proj
