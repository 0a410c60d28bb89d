"""MiniCPM-Llama3-V 2.5 int4 at its published shape under a 24 GB cap: the engine against `--max-batch 1`.

The case this project exists for (issue 20): the int4 checkpoint that fails other demos at two
concurrent users on a 24 GB card. No Gradio, no download:

    python benchmarks/gpu_v25.py              # on a lent GPU (one call, about 5 minutes on an H100)
    python benchmarks/gpu_v25.py --reduced    # the same code on a CPU: the toy copy, 1 and 4 requests

It builds the release's shape in memory (model/minicpmv2/published_shape.py: 8.5 B parameters,
random weights, the text layers in nf4 with double quantization and float16 compute, the rest in
float16), caps this process at --cap-gb of GPU memory (`torch.cuda.set_per_process_memory_fraction`),
then for each of --sweep simultaneous picture requests (half greedy, half sampling with the page's
defaults for 2.5) measures aggregate tokens/s, TTFT p50/p95, failed requests and peak memory: with
the batched engine (--max-batch = the largest of the sweep) and with `--max-batch 1` (one request
at a time, a lock) for --lock-sweep. Every shape it times is warmed first, the four pictures
included: their vision features are then cached (as for a follow-up question), so both engines
are timed on the text model and its prefill. It prints as it goes,
with timestamps (a run killed at its limit returns what it printed), then a table and the floors
(8 at once: the engine at least 5x the lock's tokens/s; 32 at once: no failed request), and
writes all of it as JSON to --json (default: $OUT/gpu_v25.json when $OUT is set).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from engine_bench import await_all, say  # beside this script

ROOT = Path(__file__).resolve().parent.parent
IMAGES = ["chart.png", "receipt.png", "diagram.png", "scene.png"]
QUESTIONS = ["Describe this image.", "What stands out here?", "Summarise what you see.", "What is shown?"]
# The share of the capped memory the engine may fill with its caches (the app's --gpu-memory-utilization).
UTILIZATION = 0.9
FLOOR_SPEEDUP_AT_8 = 5.0

class Bench:
    """The runner, its chats and requests, and the memory cap, shared by every measurement."""

    def __init__(self, args: argparse.Namespace) -> None:
        from minicpmv_demo.engine import SamplingParams
        from minicpmv_demo.intake.conversation import Conversation, Turn
        from minicpmv_demo.intake.images import prepare_image
        from minicpmv_demo.model.minicpmv2.published_shape import random_published_runner
        from minicpmv_demo.model.minicpmv2.runner import CHAT_SAMPLING

        self.args, self.cuda = args, args.device.startswith("cuda")
        self.cap_bytes = None
        if self.cuda:
            total = torch.cuda.get_device_properties(args.device).total_memory
            self.cap_bytes = min(int(args.cap_gb * 2**30), total)
            torch.cuda.set_per_process_memory_fraction(self.cap_bytes / total, args.device)
            say(f"memory capped at {self.cap_bytes / 2**30:.1f} GiB of {total / 2**30:.1f} GiB")
        say(f"building MiniCPM-Llama3-V 2.5{' (toy copy)' if args.reduced else ''} on {args.device}, "
            "random weights, nf4 double quant, float16 compute...")
        self.runner, self.parameters, self.read_bytes = random_published_runner(args.device, int4=True,
                                                                                toy=args.reduced)
        weights = torch.cuda.memory_allocated() / 2**30 if self.cuda else None
        say(f"built: {self.parameters / 1e9:.2f} B parameters"
            + (f", {weights:.1f} GiB on the GPU" if weights is not None else "")
            + f"; one decoded token reads {self.read_bytes / 2**30:.2f} GiB of weights")
        pictures = [prepare_image(ROOT / "assets" / name) for name in IMAGES]
        self.chats = [Conversation(turns=(Turn("user", QUESTIONS[i % 4], (pictures[i % 4],)),))
                      for i in range(max(args.sweep))]
        self.greedy = SamplingParams(max_new_tokens=args.new_tokens, temperature=0.0)
        self.sampled = SamplingParams(max_new_tokens=args.new_tokens, **CHAT_SAMPLING)

    def engine(self, max_batch: int):
        from minicpmv_demo.engine import Engine

        # The engine measures the card (torch's per-process cap does not show in what CUDA says is
        # free): a utilization of UTILIZATION x the cap's share of the card leaves it the capped room.
        utilization = UTILIZATION
        if self.cuda:
            utilization *= self.cap_bytes / torch.cuda.get_device_properties(0).total_memory
        started = time.perf_counter()
        engine = Engine(self.runner, max_batch=max_batch, cache_size=0, gpu_memory_utilization=utilization,
                        max_model_len=self.args.max_model_len, enforce_eager=self.args.enforce_eager).start()
        graphs = getattr(engine._batch, "graphs", None)
        say(f"engine --max-batch {max_batch}: {max_batch} slots of {engine.context_length} tokens, "
            f"{'captured ' + str(graphs.buckets) if graphs else 'eager steps'}, in {time.perf_counter() - started:.1f} s")
        return engine

    def burst(self, engine, count: int, new_tokens: int | None = None) -> dict:
        """`count` picture requests at once (every other one sampling); waits for all of them."""
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        params = [self.sampled if i % 2 else self.greedy for i in range(count)]
        if new_tokens:
            params = [replace(p, max_new_tokens=new_tokens) for p in params]
        started = time.perf_counter()
        streams = [engine.submit(self.chats[i], params[i]) for i in range(count)]
        done = await_all(streams, started)
        return {"requests": count, "tokens": done.tokens, "seconds": done.wall_s,
                "tokens_per_s": done.tokens / done.wall_s, "ttft_p50_s": done.ttft_p50_s,
                "ttft_p95_s": done.ttft_p95_s, "failed": len(done.errors),
                "largest_batch": max((s.stats.batch_size for s in streams if s.stats), default=0),
                "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if self.cuda else None}

    def sweep(self, label: str, max_batch: int, sizes: list[int]) -> list[dict]:
        engine = self.engine(max_batch)
        say(f"{label}: warming every picture and batch size...")
        self.burst(engine, len(IMAGES), new_tokens=2)
        for size in sizes:
            self.burst(engine, size, new_tokens=4)
        rows = []
        for size in sizes:
            result = {"engine": label, **self.burst(engine, size)}
            peak = f"{result['peak_gib']:.1f} GiB" if result["peak_gib"] is not None else "-"
            say(f"{label}: {size} at once: {result['tokens_per_s']:,.1f} tokens/s, TTFT p50 "
                f"{result['ttft_p50_s'] * 1000:,.0f} ms p95 {result['ttft_p95_s'] * 1000:,.0f} ms, "
                f"batch up to {result['largest_batch']}, peak {peak}, {result['failed']} failed")
            rows.append(result)
        engine.shutdown()
        del engine
        return rows


def floors(rows: list[dict]) -> dict:
    """Issue 20's GPU floors, from the rows measured (None where a row is missing)."""
    def row(engine: str, size: int) -> dict | None:
        return next((r for r in rows if r["engine"] == engine and r["requests"] == size), None)

    batched, locked, crowd = row("engine", 8), row("--max-batch 1", 8), row("engine", 32)
    speedup = batched["tokens_per_s"] / locked["tokens_per_s"] if batched and locked else None
    return {"speedup_at_8": speedup,
            "speedup_at_8_met": speedup >= FLOOR_SPEEDUP_AT_8 if speedup is not None else None,
            "failed_at_32": crowd["failed"] if crowd else None,
            "no_failure_at_32_met": crowd["failed"] == 0 if crowd else None}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--reduced", action="store_true",
                        help="CPU check: the toy copy, 1 and 4 requests (lock: 1 and 2), 4 new tokens")
    parser.add_argument("--cap-gb", type=float, default=24.0, help="GPU memory this process may use")
    parser.add_argument("--sweep", default="1,8,32", help="simultaneous requests, for the batched engine")
    parser.add_argument("--lock-sweep", default="1,8", help="simultaneous requests, for --max-batch 1")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--max-model-len", type=int, default=2048,
                        help="as the app's flag; 2048 holds a 10-slice picture (980 placeholders) and the reply")
    parser.add_argument("--enforce-eager", action="store_true", help="no captured decode steps")
    parser.add_argument("--json", default="", help="where to write the results (default: $OUT/gpu_v25.json)")
    args = parser.parse_args()
    if args.reduced:
        args.sweep, args.lock_sweep, args.new_tokens = "1,4", "1,2", min(args.new_tokens, 4)
    args.sweep = [int(s) for s in args.sweep.split(",")]
    args.lock_sweep = [int(s) for s in args.lock_sweep.split(",")]
    sys.path.insert(0, str(ROOT))
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else "CPU"
    say(f"{device}; torch {torch.__version__}; {args.new_tokens} new tokens per request; "
        f"engine {args.sweep}, --max-batch 1 {args.lock_sweep}")

    bench = Bench(args)
    rows = bench.sweep("engine", max(args.sweep), args.sweep) + bench.sweep("--max-batch 1", 1, args.lock_sweep)
    met = floors(rows)
    print(f"\n| engine | requests at once | tokens/s | TTFT p50 | TTFT p95 | largest batch | peak memory | failed |  "
          f"({device}, MiniCPM-Llama3-V 2.5 int4 shape{' (toy)' if args.reduced else ''}, cap {args.cap_gb:g} GB, "
          f"{time.strftime('%Y-%m-%d')})")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        peak = f"{r['peak_gib']:.1f} GiB" if r["peak_gib"] is not None else "-"
        print(f"| {r['engine']} | {r['requests']} | {r['tokens_per_s']:,.1f} | {r['ttft_p50_s'] * 1000:,.0f} ms | "
              f"{r['ttft_p95_s'] * 1000:,.0f} ms | {r['largest_batch']} | {peak} | {r['failed']} |")
    print(f"\nfloors: {json.dumps(met)}")
    out = args.json or (str(Path(os.environ["OUT"]) / "gpu_v25.json") if os.environ.get("OUT") else "")
    if out:
        Path(out).write_text(json.dumps({"device": device, "date": time.strftime("%Y-%m-%d"), "args": vars(args),
                                         "parameters": bench.parameters, "rows": rows, "floors": met}, indent=2))
        say(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
