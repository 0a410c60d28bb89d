"""Build MiniCPM-V 4.6 at its published size with random weights, for GPU benchmarks offline.

Nothing is downloaded. The model has the published checkpoint's shape (1.30 B parameters, see
minicpmv_demo/model/published_shape.py; not `MiniCPMV4_6Config()`'s defaults, which describe a
9.11 B model that does not exist) with random weights; the tokenizer is the tiny model's word vocabulary padded with made-up words up to the
full vocabulary, so every id the model emits decodes to a word that counts as one token; the
image processor slices as the published one does. Speed and memory depend on the shapes,
not on what the weights say, so the timings are the real model's. On the GPU machine:

    python benchmarks/full_size_model.py /tmp/minicpmv46-random
    python benchmarks/concurrency.py --model /tmp/minicpmv46-random --dtype bfloat16 --tag gpu-bf16
    python benchmarks/concurrency.py --model /tmp/minicpmv46-random --dtype bfloat16 --quant int4 \\
        --tag gpu-int4

It prints the weights' size and the memory-bandwidth bound for a single stream (each decoded
token reads every weight once, so one stream cannot beat bandwidth / weight bytes).
`--text-layers` / `--vision-layers` build a shallower copy (a smoke test on a CPU).
benchmarks/gpu_speed.py builds the same shape in memory and measures the engine itself.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
# Peak memory bandwidth by GPU name (GB/s, vendor data sheets); --bandwidth-gbs for others.
BANDWIDTH_GBS = {"H200": 4800, "H100 PCIe": 2000, "H100": 3350, "A100-SXM4-80GB": 2039, "A100": 1555,
                 "L40S": 864, "A10G": 600, "L4": 300, "RTX 4090": 1008, "RTX 3090": 936}


def build(folder: Path, text_layers: int, vision_layers: int, device: str) -> tuple[int, int, int]:
    """Write tokenizer, processor and a random bf16 model into `folder`.

    Returns (all parameters, parameters one decoded token reads, of which the output head):
    a decode step reads the text model's layers and the head, not the vision tower, and of the
    input embeddings only one row per token.
    """
    from transformers import MiniCPMV4_6ForConditionalGeneration

    from minicpmv_demo.model.minicpmv4.published_shape import PROCESSOR, published_config
    from minicpmv_demo.model.minicpmv4.tiny import (
        build_processor,
        build_word_tokenizer,
        multimodal_token_ids,
        save_checkpoint,
    )

    config = published_config(text_layers, vision_layers)
    text, vision = config.text_config, config.vision_config
    tokenizer = build_word_tokenizer(text.vocab_size)
    text.eos_token_id, text.pad_token_id = tokenizer.eos_token_id, tokenizer.pad_token_id
    config.update(multimodal_token_ids(tokenizer))
    # The vision tower's patch size decides how pixels are packed: the processor must agree.
    processor = build_processor(tokenizer, dict(PROCESSOR, patch_size=vision.patch_size))
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # built in bf16 directly: half the memory of fp32
    try:
        with torch.device(device):
            model = MiniCPMV4_6ForConditionalGeneration(config)
    finally:
        torch.set_default_dtype(previous)
    if folder.exists():
        shutil.rmtree(folder)
    save_checkpoint(model, processor, folder)

    def count(module: torch.nn.Module) -> int:
        return sum(p.numel() for p in module.parameters())

    head = count(model.get_output_embeddings())
    read_per_token = count(model.get_decoder()) - count(model.get_input_embeddings()) + head
    return count(model), read_per_token, head


def gpu_bandwidth_gbs() -> float | None:
    """The first GPU's peak memory bandwidth, looked up by its name."""
    try:
        name = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                              text=True, timeout=10, check=True).stdout.splitlines()[0]
    except (OSError, subprocess.SubprocessError, IndexError):
        return None
    return next((gbs for key, gbs in BANDWIDTH_GBS.items() if key in name), None)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--text-layers", type=int, default=0, help="0 = the published depth")
    parser.add_argument("--vision-layers", type=int, default=0, help="0 = the published depth")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="where the random weights are made (fast on a GPU)")
    parser.add_argument("--bandwidth-gbs", type=float, default=0.0,
                        help="GPU memory bandwidth for the bound; default: looked up by GPU name")
    args = parser.parse_args()

    params, per_token, head = build(args.folder, args.text_layers, args.vision_layers, args.device)
    bf16_gb = per_token * 2 / 1e9
    # nf4 with double quant: ~4.13 bits per quantized weight; bitsandbytes leaves the output head
    # in 16 bits. Norms and small parts are counted as 4-bit: a slight underestimate of the bytes.
    int4_gb = ((per_token - head) * 4.13 / 8 + head * 2) / 1e9
    print(f"built {args.folder}: {params / 1e9:.2f} B parameters; one decoded token reads "
          f"{per_token / 1e9:.2f} B of them: {bf16_gb:.1f} GB in bf16, about {int4_gb:.1f} GB in int4")
    bandwidth = args.bandwidth_gbs or gpu_bandwidth_gbs()
    if bandwidth:
        print(f"single-stream bound at {bandwidth:,.0f} GB/s: bf16 {bandwidth / bf16_gb:,.0f} tokens/s, "
              f"int4 about {bandwidth / int4_gb:,.0f} tokens/s")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main())
