"""Build MiniCPM-V 4.6 at its published size with random weights, for GPU benchmarks offline.

Nothing is downloaded. The model has the published checkpoint's shape (1.30 B parameters, see
minicpmv_demo/model/minicpmv4/published_shape.py; not `MiniCPMV4_6Config()`'s defaults, which
describe a 9.11 B model that does not exist) with random weights; the tokenizer is the tiny
model's word vocabulary padded with made-up words up to the full vocabulary, so every id the
model emits decodes to a word that counts as one token; the image processor slices as the
published one does. Speed and memory depend on the shapes, not on what the weights say, so the
timings are the real model's. On the GPU machine:

    python benchmarks/full_size_model.py /tmp/minicpmv46-random
    python benchmarks/concurrency.py --model /tmp/minicpmv46-random --dtype bfloat16 --tag gpu-bf16
    python benchmarks/concurrency.py --model /tmp/minicpmv46-random --dtype bfloat16 --quant int4 \\
        --tag gpu-int4

It prints the weights' size and the memory-bandwidth bound for a single stream (each decoded
token reads every weight once, so one stream cannot beat bandwidth / weight bytes).
`--text-layers` / `--vision-layers` build a shallower copy (a smoke test on a CPU).
benchmarks/gpu_speed.py builds the same shape in memory and measures the engine itself; the GPU
check (gpu_check.py) loads this folder with --quant int4 / int8.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import torch

from engine_bench import ROOT, gpu_bandwidth_gbs


def build(folder: Path, text_layers: int, vision_layers: int, device: str) -> tuple[int, int, int]:
    """Write tokenizer, processor and a random bf16 model into `folder` (made on `device`).

    Returns (all parameters, parameters one decoded token reads, of which the output head):
    a decode step reads the text model's layers and the head, not the vision tower, and of the
    input embeddings only one row per token.
    """
    from minicpmv_demo.model.minicpmv4.published_shape import random_published_runner
    from minicpmv_demo.model.minicpmv4.tiny import save_checkpoint

    runner, params, read_per_token = random_published_runner(device, torch.bfloat16, text_layers, vision_layers)
    if folder.exists():
        shutil.rmtree(folder)
    save_checkpoint(runner.model, runner.processor, folder)
    head = sum(p.numel() for p in runner.model.get_output_embeddings().parameters())
    return params, read_per_token, head


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
