"""The published MiniCPM-V 4.6 shape the benchmarks build: 1.30 B parameters, not the 9.11 B of
`MiniCPMV4_6Config()` defaults."""

from __future__ import annotations

import torch
from transformers import MiniCPMV4_6ForConditionalGeneration

from minicpmv_demo.model.minicpmv4.published_shape import published_config


def parameters(config) -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in MiniCPMV4_6ForConditionalGeneration(config).parameters())


def test_published_shape_has_the_published_size():
    config = published_config()
    assert round(parameters(config) / 1e9, 2) == 1.30
    kinds = config.text_config.layer_types
    assert (kinds.count("full_attention"), kinds.count("linear_attention")) == (6, 18)
    assert config.tie_word_embeddings and config.text_config.vocab_size == 248094


def test_a_shallow_copy_keeps_both_layer_kinds():
    config = published_config(text_layers=2, vision_layers=1)
    assert config.text_config.layer_types == ["linear_attention", "full_attention"]
    assert config.vision_config.num_hidden_layers == 1 and config.insert_layer_id == 0
    assert config.text_config.hidden_size == 1024, "widths stay as published"
