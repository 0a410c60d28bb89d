"""Engine speed at the published MiniCPM-V 4.6 size (1.30 B, random weights), no Gradio.

    python benchmarks/gpu_speed.py                   # on a lent GPU (gpu_check.sh's stage 4 is the short form)
    python benchmarks/gpu_speed.py --reduced         # the same script on a CPU, small

Prints, with timestamps (a run killed at its time limit returns what it printed):
- single-stream tokens/s of plain `model.generate`, beside the memory-bandwidth bound (each
  decoded token reads the text layers and the head once);
- for each mode (`eager`: --enforce-eager; `graphs`: captured decode steps), a sweep of 1, 8,
  32, 64 simultaneous image requests: aggregate tokens/s, TTFT p50/p95, peak GPU memory; half
  the requests sample at the page's default temperature, as real users do;
- a newcomer's TTFT while the largest burst decodes, against the idle TTFT;
- `--max-batch 1` (one request at a time, a lock) with 8 requests at once;
- how many greedy rows of the graphs mode equal eager for their first 16 tokens.
Every shape it times is warmed first (each picture through the vision tower, each batch size).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engine_bench import Bench, bandwidth_bound, gpu_bandwidth_gbs, say  # noqa: E402

AGREEMENT_TOKENS = 16


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="bfloat16" if torch.cuda.is_available() else "float32")
    parser.add_argument("--reduced", action="store_true",
                        help="CPU check: 2 text layers, 1 vision layer, sweep 1,4, 8 new tokens")
    parser.add_argument("--text-layers", type=int, default=0, help="0 = the published 24")
    parser.add_argument("--vision-layers", type=int, default=0, help="0 = the published 27")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--sweep", default="1,8,32,64")
    parser.add_argument("--modes", default="eager,graphs")
    parser.add_argument("--max-model-len", type=int, default=2048,
                        help="as the app's flag (0 = auto: half the free GPU memory, which would then count "
                             "in the peak); 2048 holds these prompts and replies")
    parser.add_argument("--lock-requests", type=int, default=8, help="requests at once for --max-batch 1")
    parser.add_argument("--bandwidth-gbs", type=float, default=0.0)
    args = parser.parse_args()
    if args.reduced:
        args.text_layers, args.vision_layers = args.text_layers or 2, args.vision_layers or 1
        args.sweep, args.new_tokens, args.lock_requests = "1,4", min(args.new_tokens, 8), 2
    from minicpmv_demo.model.minicpmv4.published_shape import random_published_runner

    sizes = [int(s) for s in args.sweep.split(",")]
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else "CPU"
    say(f"{device}; torch {torch.__version__}; {args.new_tokens} new tokens per request; sweep {sizes}")
    say(f"building the published shape on {args.device} ({args.dtype}, random weights)...")
    dtype = getattr(torch, args.dtype)
    runner, params, read_per_token = random_published_runner(args.device, dtype, args.text_layers, args.vision_layers)
    say(f"built: {params / 1e9:.2f} B parameters, one decoded token reads {read_per_token / 1e9:.2f} B")
    bench = Bench(runner, args.device, args.new_tokens, args.max_model_len)
    gbs = args.bandwidth_gbs or (gpu_bandwidth_gbs() if args.device.startswith("cuda") else None)
    bound = bandwidth_bound(read_per_token, dtype, gbs)
    say(f"single-stream bandwidth bound at {gbs:,.0f} GB/s: {bound:,.0f} tokens/s" if bound
        else "bandwidth bound: unknown here (--bandwidth-gbs)")
    say(f"model.generate, one request, greedy: {bench.generate_tokens_per_s():.1f} tokens/s")
    rows, greedy = [], {}
    for mode in args.modes.split(","):
        engine = bench.engine(max(sizes), eager=mode == "eager")
        for size, result in bench.sweep(engine, mode, sizes).items():
            rows.append((mode, size, result))
            greedy.setdefault(mode, []).extend(result["greedy_texts"])
        idle = rows[[r[:2] for r in rows].index((mode, sizes[0]))][2]["ttft_p50_s"]
        newcomer = bench.newcomer_ttft(engine, max(sizes) - 1)
        say(f"{mode}: a newcomer while {max(sizes) - 1} decode: TTFT {newcomer * 1000:,.0f} ms "
            f"(idle {idle * 1000:,.0f} ms)")
        engine.shutdown()
        del engine
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()
    lock = bench.engine(1, eager="graphs" not in args.modes)
    bench.warm(lock, [1])
    locked = bench.burst(lock, args.lock_requests)
    lock.shutdown()
    say(f"--max-batch 1, {args.lock_requests} at once: {locked['tokens_per_s']:,.1f} tokens/s, TTFT p50 "
        f"{locked['ttft_p50_s']:.1f} s p95 {locked['ttft_p95_s']:.1f} s")
    if {"eager", "graphs"} <= set(greedy):
        pairs = list(zip(greedy["eager"], greedy["graphs"], strict=True))
        same = sum(a.split()[:AGREEMENT_TOKENS] == b.split()[:AGREEMENT_TOKENS] for a, b in pairs)
        say(f"graphs vs eager, greedy rows equal for their first {AGREEMENT_TOKENS} tokens: {same}/{len(pairs)}")

    print(f"\n| mode | requests at once | tokens/s | TTFT p50 | TTFT p95 | peak memory | failed |  ({device}, "
          f"{args.dtype}, {params / 1e9:.2f} B, {time.strftime('%Y-%m-%d')})")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for mode, size, result in rows:
        peak = f"{result['peak_mb'] / 1024:.1f} GB" if result["peak_mb"] is not None else "-"
        print(f"| {mode} | {size} | {result['tokens_per_s']:,.1f} | {result['ttft_p50_s'] * 1000:,.0f} ms "
              f"| {result['ttft_p95_s'] * 1000:,.0f} ms | {peak} | {result['errors']} |")
    print(f"| --max-batch 1 | {args.lock_requests} | {locked['tokens_per_s']:,.1f} | {locked['ttft_p50_s']:.1f} s "
          f"| {locked['ttft_p95_s']:.1f} s | - | {locked['errors']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
