"""Engine speed at the published MiniCPM-V 4.6 size (1.30 B, random weights), no Gradio.

    python benchmarks/gpu_speed.py                                  # on a lent GPU (see gpu_run.sh)
    python benchmarks/gpu_speed.py --reduced                        # the same script on a CPU, small

Prints, with timestamps (a run killed at its time limit returns what it printed):
- single-stream tokens/s of plain `model.generate` and of the engine, beside the memory-bandwidth
  bound (each decoded token reads the text layers and the head once);
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
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
IMAGES = ["chart.png", "receipt.png", "diagram.png", "scene.png"]
QUESTIONS = ["Describe this image.", "What stands out here?", "Summarise what you see.", "What is shown?"]
AGREEMENT_TOKENS = 16
STARTED = time.perf_counter()


def say(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')} +{time.perf_counter() - STARTED:6.1f}s] {message}", flush=True)


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))]


def peak_mb(device: str) -> float | None:
    return torch.cuda.max_memory_allocated() / 2**20 if device.startswith("cuda") else None


def reset_peak(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


class Bench:
    """The runner, its chats and the two kinds of request, shared by every measurement."""

    def __init__(self, args) -> None:
        from minicpmv_demo.intake.conversation import Conversation, Turn
        from minicpmv_demo.engine import SamplingParams
        from minicpmv_demo.intake.images import prepare_image
        from minicpmv_demo.model.minicpmv4.published_shape import TEMPERATURE, random_published_runner

        self.args, self.device = args, args.device
        say(f"building the published shape on {args.device} ({args.dtype}, random weights)...")
        self.runner, params, self.read_per_token = random_published_runner(
            args.device, getattr(torch, args.dtype), args.text_layers, args.vision_layers)
        self.params = params
        say(f"built: {params / 1e9:.2f} B parameters, one decoded token reads {self.read_per_token / 1e9:.2f} B")
        pictures = [prepare_image(ROOT / "assets" / name) for name in IMAGES]
        self.chats = [Conversation(turns=(Turn("user", QUESTIONS[i % 4], (pictures[i % 4],)),)) for i in range(64)]
        self.greedy = SamplingParams(max_new_tokens=args.new_tokens, temperature=0.0)
        # The page's default temperature (the published generation_config's); top_p as the page sends.
        self.sampled = SamplingParams(max_new_tokens=args.new_tokens, temperature=TEMPERATURE, top_p=0.8)

    def engine(self, max_batch: int, eager: bool):
        from minicpmv_demo.engine import Engine

        started = time.perf_counter()
        engine = Engine(self.runner, max_batch=max_batch, cache_size=0, gpu_memory_utilization=0.9,
                        max_model_len=self.args.max_model_len, enforce_eager=eager).start()
        graphs = getattr(engine._batch, "graphs", None)
        say(f"engine max_batch={max_batch} {'eager' if eager else 'graphs'}: slots of {engine.context_length} "
            f"tokens, {'captured ' + str(graphs.buckets) if graphs else 'no captured steps'} "
            f"in {time.perf_counter() - started:.1f} s")
        return engine

    def burst(self, engine, count: int, sampled_share: float = 0.5, new_tokens: int | None = None) -> dict:
        """`count` image requests at once (every other one sampled); waits for all."""
        from dataclasses import replace

        from minicpmv_demo.engine import ReplyError

        reset_peak(self.device)
        params = [self.sampled if i % 2 and sampled_share else self.greedy for i in range(count)]
        if new_tokens:
            params = [replace(p, max_new_tokens=new_tokens) for p in params]
        started = time.perf_counter()
        streams = [engine.submit(self.chats[i], params[i]) for i in range(count)]
        texts, errors = [], []
        for stream in streams:  # a failed request is counted and shown, never the end of the run
            try:
                texts.append(stream.result(timeout=600))
            except ReplyError as exc:
                texts.append("")
                errors.append(str(exc))
        wall = time.perf_counter() - started
        if errors:
            say(f"{len(errors)} of {count} requests failed, e.g.: {errors[0]}")
        ttfts = [(s.first_text_at or s.submitted_at) - s.submitted_at for s in streams]
        tokens = sum(s.stats.tokens for s in streams if s.stats)
        return {"count": count, "tokens": tokens, "wall": wall, "tokens_per_s": tokens / wall,
                "ttft_p50": statistics.median(ttfts), "ttft_p95": percentile(ttfts, 0.95),
                "peak_mb": peak_mb(self.device), "errors": len(errors),
                "greedy_texts": [t for t, p in zip(texts, params, strict=True) if p.greedy]}

    def warm(self, engine, sizes: list[int]) -> None:
        """Every picture through the vision tower, every batch size through a few decode steps."""
        self.burst(engine, 4, new_tokens=2)
        for size in sizes:
            self.burst(engine, size, new_tokens=4)

    def newcomer_ttft(self, engine, running: int) -> float:
        """TTFT of one request arriving while `running` others decode."""
        streams = [engine.submit(self.chats[i], self.greedy) for i in range(running)]
        deadline = time.perf_counter() + 600
        while any(s.first_text_at is None and not s.done for s in streams) and time.perf_counter() < deadline:
            time.sleep(0.005)
        newcomer = engine.submit(self.chats[running % 64], self.greedy)
        for stream in (newcomer, *streams):
            stream.result(timeout=600)  # greedy: never expected to fail
        return (newcomer.first_text_at or newcomer.submitted_at) - newcomer.submitted_at

    def generate_tokens_per_s(self) -> float:
        prompt = self.runner.encode(self.chats[0])
        inputs = {k: v.to(self.runner.device) for k, v in prompt.inputs.items()}
        for _ in range(2):  # the first call warms the shapes
            if self.device.startswith("cuda"):
                torch.cuda.synchronize()
            started = time.perf_counter()
            with torch.inference_mode():
                out = self.runner.model.generate(**inputs, max_new_tokens=self.args.new_tokens, do_sample=False)
            if self.device.startswith("cuda"):
                torch.cuda.synchronize()
            seconds = time.perf_counter() - started
        return (out.shape[1] - prompt.length) / seconds


def bandwidth_bound(bench: Bench) -> str:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from full_size_model import gpu_bandwidth_gbs

    gbs = bench.args.bandwidth_gbs or (gpu_bandwidth_gbs() if bench.device.startswith("cuda") else None)
    if not gbs:
        return "bandwidth bound: unknown here (--bandwidth-gbs)"
    element = torch.finfo(getattr(torch, bench.args.dtype)).bits // 8
    bound = gbs * 1e9 / (bench.read_per_token * element)
    return f"single-stream bandwidth bound at {gbs:,.0f} GB/s: {bound:,.0f} tokens/s"


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
    sys.path.insert(0, str(ROOT))
    sizes = [int(s) for s in args.sweep.split(",")]
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else "CPU"
    say(f"{device}; torch {torch.__version__}; {args.new_tokens} new tokens per request; sweep {sizes}")

    bench = Bench(args)
    say(bandwidth_bound(bench))
    say(f"model.generate, one request, greedy: {bench.generate_tokens_per_s():.1f} tokens/s")
    rows, greedy, newcomer = [], {}, {}
    for mode in args.modes.split(","):
        engine = bench.engine(max(sizes), eager=mode == "eager")
        say(f"{mode}: warming every shape...")
        bench.warm(engine, sizes)
        for size in sizes:
            result = bench.burst(engine, size, sampled_share=0.5 if size > 1 else 0.0)
            peak = f"{result['peak_mb']:,.0f} MB" if result["peak_mb"] is not None else "-"
            say(f"{mode}: {size} at once: {result['tokens_per_s']:,.1f} tokens/s, TTFT p50 "
                f"{result['ttft_p50'] * 1000:,.0f} ms p95 {result['ttft_p95'] * 1000:,.0f} ms, peak {peak}, "
                f"{result['errors']} failed")
            rows.append((mode, size, result))
            greedy.setdefault(mode, []).extend(result["greedy_texts"])
        idle = rows[[r[:2] for r in rows].index((mode, sizes[0]))][2]["ttft_p50"]
        newcomer[mode] = (bench.newcomer_ttft(engine, max(sizes) - 1), idle)
        say(f"{mode}: a newcomer while {max(sizes) - 1} decode: TTFT {newcomer[mode][0] * 1000:,.0f} ms "
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
        f"{locked['ttft_p50']:.1f} s p95 {locked['ttft_p95']:.1f} s")
    if {"eager", "graphs"} <= set(greedy):
        pairs = list(zip(greedy["eager"], greedy["graphs"], strict=True))
        same = sum(a.split()[:AGREEMENT_TOKENS] == b.split()[:AGREEMENT_TOKENS] for a, b in pairs)
        say(f"graphs vs eager, greedy rows equal for their first {AGREEMENT_TOKENS} tokens: {same}/{len(pairs)}")

    print(f"\n| mode | requests at once | tokens/s | TTFT p50 | TTFT p95 | peak memory | failed |  ({device}, "
          f"{args.dtype}, {bench.params / 1e9:.2f} B, {time.strftime('%Y-%m-%d')})")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for mode, size, result in rows:
        peak = f"{result['peak_mb'] / 1024:.1f} GB" if result["peak_mb"] is not None else "-"
        print(f"| {mode} | {size} | {result['tokens_per_s']:,.1f} | {result['ttft_p50'] * 1000:,.0f} ms "
              f"| {result['ttft_p95'] * 1000:,.0f} ms | {peak} | {result['errors']} |")
    print(f"| --max-batch 1 | {args.lock_requests} | {locked['tokens_per_s']:,.1f} | {locked['ttft_p50']:.1f} s "
          f"| {locked['ttft_p95']:.1f} s | - | {locked['errors']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
