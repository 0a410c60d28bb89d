"""MiniCPM-V 2.6's vision tower: SigLIP with NaViT patching, positions from each slice's own grid.

2.6 ships its own copy of the tower (`modeling_navit_siglip.py: SiglipVisionTransformer`). Its
modules and weight names are those of transformers' `Idefics2VisionTransformer` (embeddings,
encoder layers, post layer norm); what differs is the forward:
- the position ids come from each slice's (rows, columns) of patches (`tgt_sizes`), bucketed
  on a 2-D grid, where 2.5 buckets one long row (see `MiniCPMV25._run_vision`);
- padding patches are masked for real (2.6 fixed 2.5's mask index);
- attention is eager unless flash attention 2 was asked for (the release: "not support sdpa").
This class keeps Idefics2's modules and writes that forward; the position ids follow the
release's per-slice `torch.arange` / `torch.bucketize` steps so their float rounding is the same.
"""

from __future__ import annotations

import torch
from transformers.masking_utils import create_bidirectional_mask
from transformers.modeling_outputs import BaseModelOutput
from transformers.models.idefics2.modeling_idefics2 import Idefics2VisionTransformer


def navit_position_ids(patch_mask: torch.Tensor, tgt_sizes: torch.Tensor | None, patches_per_side: int) -> torch.Tensor:
    """Position-embedding ids [B, max_h * max_w] for packed slices.

    Each slice's rows and columns are spread over the table's `patches_per_side` buckets per
    side (fractional coordinates i / rows, j / columns, bucketed); patches outside the slice's mask
    get id 0. Without `tgt_sizes` the grid is read off the mask, as the release does.
    """
    batch, max_h, max_w = patch_mask.shape
    boundaries = torch.arange(1 / patches_per_side, 1.0, 1 / patches_per_side)
    position_ids = torch.full((batch, max_h * max_w), fill_value=0)
    for index, mask in enumerate(patch_mask):
        if tgt_sizes is not None:
            rows, columns = tgt_sizes[index][0], tgt_sizes[index][1]
        else:
            rows, columns = mask[:, 0].sum(), mask[0].sum()
        row_coords = torch.arange(0, 1 - 1e-6, 1 / rows)
        column_coords = torch.arange(0, 1 - 1e-6, 1 / columns)
        row_buckets = torch.bucketize(row_coords, boundaries, right=True)
        column_buckets = torch.bucketize(column_coords, boundaries, right=True)
        ids = (row_buckets[:, None] * patches_per_side + column_buckets).flatten()
        position_ids[index][mask.reshape(-1).cpu()] = ids
    return position_ids


class NavitVisionTransformer(Idefics2VisionTransformer):
    """Idefics2's SigLIP modules with 2.6's forward (see the module docstring)."""

    def forward(self, pixel_values: torch.Tensor, patch_attention_mask: torch.Tensor | None = None,
                tgt_sizes: torch.Tensor | None = None, **kwargs) -> BaseModelOutput:
        batch = pixel_values.size(0)
        patch = self.config.patch_size
        if patch_attention_mask is None:
            patch_attention_mask = torch.ones((batch, pixel_values.size(2) // patch, pixel_values.size(3) // patch),
                                              dtype=torch.bool, device=pixel_values.device)
        embeddings = self.embeddings
        hidden = embeddings.patch_embedding(pixel_values).flatten(2).transpose(1, 2)
        position_ids = navit_position_ids(patch_attention_mask.cpu(), None if tgt_sizes is None else tgt_sizes.cpu(),
                                          embeddings.num_patches_per_side)
        hidden = hidden + embeddings.position_embedding(position_ids.to(embeddings.position_embedding.weight.device))
        flat_mask = patch_attention_mask.reshape(batch, -1)
        attention_mask = None
        if not bool(flat_mask.all()):
            attention_mask = create_bidirectional_mask(config=self.config, inputs_embeds=hidden,
                                                       attention_mask=flat_mask)
        hidden = self.encoder(inputs_embeds=hidden, attention_mask=attention_mask).last_hidden_state
        return BaseModelOutput(last_hidden_state=self.post_layernorm(hidden))
