"""What the engine benchmarks share: timestamped progress, image chats, bursts of requests
against an `Engine` (tokens/s, TTFT, peak memory), warming, `model.generate` beside it, and the
memory-bandwidth bound of one stream. gpu_speed.py, gpu_check.py and profile_step.py use it.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

import engine_surface as surface

ROOT = Path(__file__).resolve().parent.parent
IMAGES = ["chart.png", "receipt.png", "diagram.png", "scene.png"]
QUESTIONS = ["Describe this image.", "What stands out here?", "Summarise what you see.", "What is shown?"]
# Peak memory bandwidth by GPU name (GB/s, vendor data sheets); --bandwidth-gbs for others.
BANDWIDTH_GBS = {"H200": 4800, "H100 PCIe": 2000, "H100": 3350, "A100-SXM4-80GB": 2039, "A100": 1555,
                 "L40S": 864, "A10G": 600, "L4": 300, "RTX 4090": 1008, "RTX 3090": 936}
# Seconds in progress lines count from here: the run's start where a driver exported it (its
# stages, forked or spawned, then count from the same moment), else this import.
STARTED = float(os.environ.get("BENCH_STARTED_AT") or time.time())


def say(message: str) -> None:
    """A progress line with the time and the seconds since start: a killed run keeps what it printed."""
    print(f"[{time.strftime('%H:%M:%S')} +{time.time() - STARTED:6.1f}s] {message}", flush=True)


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))]


@dataclass
class Burst:
    """What a burst of requests gave back: each reply ("" where it failed), the failures, timings."""

    texts: list[str]
    errors: list[str]
    tokens: int
    wall_s: float
    ttft_p50_s: float
    ttft_p95_s: float


def await_all(streams: list, started: float) -> Burst:
    """Wait for every reply of a burst submitted at `started`: a failed request is counted and
    shown, never the end of the run."""
    from minicpmv_demo.engine import ReplyError

    texts, errors = [], []
    for stream in streams:
        try:
            texts.append(stream.result(timeout=600))
        except ReplyError as exc:
            texts.append("")
            errors.append(str(exc))
    wall = time.perf_counter() - started
    if errors:
        say(f"{len(errors)} of {len(streams)} requests failed, e.g.: {errors[0]}")
    ttfts = [(s.first_text_at or s.submitted_at) - s.submitted_at for s in streams]
    return Burst(texts, errors, sum(s.stats.tokens for s in streams if s.stats), wall,
                 statistics.median(ttfts), percentile(ttfts, 0.95))


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def reset_peak(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def peak_mb(device: str) -> float | None:
    return torch.cuda.max_memory_allocated() / 2**20 if device.startswith("cuda") else None


def gpu_bandwidth_gbs() -> float | None:
    """The first GPU's peak memory bandwidth, looked up by its name (nvidia-smi: no CUDA context)."""
    try:
        name = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                              text=True, timeout=10, check=True).stdout.splitlines()[0]
    except (OSError, subprocess.SubprocessError, IndexError):
        return None
    return next((gbs for key, gbs in BANDWIDTH_GBS.items() if key in name), None)


def bandwidth_bound(read_per_token: int, dtype: torch.dtype, gbs: float | None) -> float | None:
    """Tokens/s one stream cannot beat: each decoded token reads the text layers and the head once."""
    if not gbs:
        return None
    return gbs * 1e9 / (read_per_token * torch.finfo(dtype).bits // 8)


def image_chats(count: int) -> list:
    """`count` one-picture questions over the example pictures, in a fixed order."""
    from minicpmv_demo.intake.conversation import Conversation, Turn
    from minicpmv_demo.intake.images import prepare_image

    pictures = [prepare_image(ROOT / "assets" / name) for name in IMAGES]
    return [Conversation(turns=(Turn("user", QUESTIONS[i % 4], (pictures[i % 4],)),)) for i in range(count)]


class Bench:
    """A runner, its chats and the two kinds of request, shared by every measurement."""

    def __init__(self, runner, device: str, new_tokens: int, max_model_len: int, chats: int = 64) -> None:
        from minicpmv_demo.engine import SamplingParams
        from minicpmv_demo.model.minicpmv4.published_shape import TEMPERATURE

        self.runner, self.device, self.new_tokens, self.max_model_len = runner, device, new_tokens, max_model_len
        self.chats = image_chats(chats)
        self.greedy = SamplingParams(max_new_tokens=new_tokens, temperature=0.0)
        # The page's default temperature (the published generation_config's); top_p as the page sends.
        self.sampled = SamplingParams(max_new_tokens=new_tokens, temperature=TEMPERATURE, top_p=0.8)

    def engine(self, max_batch: int, eager: bool):
        """An engine as the app starts one (--gpu-memory-utilization 0.9), with or without graphs."""
        started = time.perf_counter()
        engine = surface.start_engine(self.runner, max_batch=max_batch, max_model_len=self.max_model_len, enforce_eager=eager)
        graphs = surface.engine_graphs(engine)
        captured = (f"captured batch buckets {surface.graph_buckets(graphs)} at widths {surface.graph_widths(graphs)}"
                    if graphs is not None else "no captured steps")
        say(f"engine max_batch={max_batch} {'eager' if eager else 'graphs'}: slots of "
            f"{surface.engine_slot_length(engine)} tokens, {captured}, in {time.perf_counter() - started:.1f} s")
        return engine

    def burst(self, engine, count: int, sampled_share: float = 0.5, new_tokens: int | None = None) -> dict:
        """`count` image requests at once (every other one sampled when `sampled_share`); waits for all."""
        reset_peak(self.device)
        params = [self.sampled if i % 2 and sampled_share else self.greedy for i in range(count)]
        if new_tokens:
            params = [replace(p, max_new_tokens=new_tokens) for p in params]
        started = time.perf_counter()
        streams = [engine.submit(self.chats[i % len(self.chats)], params[i]) for i in range(count)]
        done = await_all(streams, started)
        texts, errors = done.texts, done.errors
        return {"count": count, "tokens": done.tokens, "wall_s": done.wall_s, "tokens_per_s": done.tokens / done.wall_s,
                "ttft_p50_s": done.ttft_p50_s, "ttft_p95_s": done.ttft_p95_s,
                "peak_mb": peak_mb(self.device), "errors": len(errors), "first_error": errors[0] if errors else None,
                "sampled": sum(not p.greedy for p in params),
                "greedy_texts": [t for t, p in zip(texts, params, strict=True) if p.greedy]}

    def sweep(self, engine, mode: str, sizes: list[int], on_result=None) -> dict[int, dict]:
        """Warm every size, then time each: 1 request greedy, more with every other one sampled.
        `on_result(results)` is called after each size (a stage writes its file there)."""
        self.warm(engine, sizes)
        results: dict[int, dict] = {}
        for size in sizes:
            result = self.burst(engine, size, sampled_share=0.5 if size > 1 else 0.0)
            results[size] = result
            peak = f"{result['peak_mb']:,.0f} MB" if result["peak_mb"] is not None else "-"
            say(f"{mode}: {size} at once: {result['tokens_per_s']:,.1f} tokens/s, TTFT p50 "
                f"{result['ttft_p50_s'] * 1000:,.0f} ms p95 {result['ttft_p95_s'] * 1000:,.0f} ms, peak {peak}, "
                f"{result['errors']} failed")
            if on_result:
                on_result(results)
        return results

    def warm(self, engine, sizes: list[int]) -> None:
        """Every picture through the vision tower, every batch size through a few decode steps."""
        self.burst(engine, 4, new_tokens=2)
        for size in sizes:
            self.burst(engine, size, new_tokens=4)

    def newcomer_ttft(self, engine, running: int) -> float:
        """TTFT of one request arriving while `running` others decode."""
        streams = [engine.submit(self.chats[i % len(self.chats)], self.greedy) for i in range(running)]
        deadline = time.perf_counter() + 600
        while any(s.first_text_at is None and not s.done for s in streams) and time.perf_counter() < deadline:
            time.sleep(0.005)
        newcomer = engine.submit(self.chats[running % len(self.chats)], self.greedy)
        for stream in (newcomer, *streams):
            stream.result(timeout=600)  # greedy: never expected to fail
        return (newcomer.first_text_at or newcomer.submitted_at) - newcomer.submitted_at

    def generate_tokens_per_s(self) -> float:
        """One greedy request through plain `model.generate`, its shapes warmed by a short call first."""
        prompt = self.runner.encode(self.chats[0])
        inputs = {k: v.to(self.runner.device) for k, v in prompt.inputs.items()}
        seconds, out = 0.0, None
        for new_tokens in (4, self.new_tokens):
            synchronize(self.device)
            started = time.perf_counter()
            with torch.inference_mode():
                out = self.runner.model.generate(**inputs, max_new_tokens=new_tokens, do_sample=False)
            synchronize(self.device)
            seconds = time.perf_counter() - started
        return (out.shape[1] - prompt.length) / seconds
