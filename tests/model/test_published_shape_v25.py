"""The MiniCPM-Llama3-V 2.5 (int4) shape the GPU benchmark builds (model/minicpmv2/published_shape.py),
and that benchmark (benchmarks/gpu_v25.py) run end to end on the CPU with its toy copy."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from test_minicpmv2_weights import RELEASE_CONFIG, expected_weights
from minicpmv_demo.model.minicpmv2 import MiniCPMV25
from minicpmv_demo.model.minicpmv2.published_shape import padded_tokenizer, published_config

ROOT = Path(__file__).resolve().parents[2]


def test_the_shape_is_the_releases():
    config = published_config(RELEASE_CONFIG["vocab_size"])
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                "vocab_size", "max_position_embeddings", "query_num", "drop_vision_last_layer"):
        assert getattr(config, key) == RELEASE_CONFIG[key], key
    assert config.rope_parameters["rope_theta"] == RELEASE_CONFIG["rope_theta"]
    for key, value in RELEASE_CONFIG["vision_config"].items():
        assert getattr(config.vision_config, key) == value, key
    with torch.device("meta"):
        model = MiniCPMV25(config)
    shapes = {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}
    assert shapes == expected_weights(config) and len(shapes) == 741
    assert round(sum(p.numel() for p in model.parameters()) / 1e9, 2) == 8.54


def test_the_padded_tokenizer_decodes_every_id_and_keeps_the_special_tokens():
    tokenizer = padded_tokenizer(RELEASE_CONFIG["vocab_size"])
    assert len(tokenizer) == 128256
    assert tokenizer.decode([127999, 5000, 128255], skip_special_tokens=True) == " w127999 w5000"
    assert tokenizer.convert_tokens_to_ids(["<|begin_of_text|>", "<|eot_id|>"]) == [128000, 128009], "the release's ids"
    assert tokenizer.decode(tokenizer.encode("What is this?", add_special_tokens=False)) == "What is this?"


def test_the_gpu_benchmark_runs_reduced_on_the_cpu(tmp_path):
    out = tmp_path / "gpu_v25.json"
    result = subprocess.run([sys.executable, "benchmarks/gpu_v25.py", "--reduced", "--json", str(out)], cwd=ROOT,
                            capture_output=True, text=True, timeout=600,
                            env={**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(ROOT)})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "| engine | 4 |" in result.stdout and "| --max-batch 1 | 2 |" in result.stdout
    report = json.loads(out.read_text())
    assert [(r["engine"], r["requests"]) for r in report["rows"]] == [
        ("engine", 1), ("engine", 4), ("--max-batch 1", 1), ("--max-batch 1", 2)]
    assert all(r["failed"] == 0 and r["tokens"] > 0 for r in report["rows"])
    assert report["floors"]["speedup_at_8"] is None, "no 8-request rows in the reduced run"
