"""The engine without Gradio: its cost at concurrency 1 against plain `model.generate`, and its
batching gain on the model alone.

    python benchmarks/engine_overhead.py [--model tiny] [--new-tokens 64] [--repeats 5]

At concurrency 1 the engine runs the same prefill + decode as `generate` through its own loop
(plus streaming and bookkeeping); the two should be within 10% of each other.
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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--quant", default="auto")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    from minicpmv_demo.intake.conversation import Conversation, Turn
    from minicpmv_demo.engine import Engine, SamplingParams
    from minicpmv_demo.intake.images import prepare_image
    from minicpmv_demo.model import load_model
    from minicpmv_demo.config.settings import Settings

    loaded = load_model(Settings(model=args.model, dtype=args.dtype, quant=args.quant))
    if loaded.is_tiny:
        torch.set_num_threads(1)  # what the app does for the tiny model
    runner = loaded.runner
    chats = [Conversation(turns=(Turn("user", "Describe this image.", (prepare_image(ROOT / "assets" / n),)),))
             for n in IMAGES]
    params = SamplingParams(max_new_tokens=args.new_tokens)
    # Half of the batched requests sample as the page sends them (ChatService.defaults;
    # the app is not imported: a GPU machine may lack Gradio). All-greedy runs once hid
    # that sampling on CUDA failed every batch.
    page_default = SamplingParams(max_new_tokens=args.new_tokens, temperature=0.7, top_p=0.8)

    def generate_once(chat) -> int:
        prompt = runner.encode(chat)
        inputs = {k: v.to(runner.device) for k, v in prompt.inputs.items()}
        with torch.inference_mode():
            out = runner.model.generate(**inputs, max_new_tokens=args.new_tokens, do_sample=False)
        return out.shape[1] - prompt.length

    engine = Engine(runner, max_batch=8, cache_size=0).start()

    def engine_once(chat) -> int:
        stream = engine.submit(chat, params)
        stream.result()
        return stream.stats.tokens

    def timed(fn) -> float:
        """Tokens/s over all example chats, one after another (concurrency 1)."""
        start, tokens = time.perf_counter(), 0
        for chat in chats:
            tokens += fn(chat)
        return tokens / (time.perf_counter() - start)

    for fn in (generate_once, engine_once):  # warm-up (and the engine's vision cache, fairly: both warm)
        timed(fn)
    rows = {"model.generate": [], "engine": []}
    for _ in range(args.repeats):  # interleaved, so drifting machine load hits both alike
        rows["model.generate"].append(timed(generate_once))
        rows["engine"].append(timed(engine_once))
    generate, served = statistics.median(rows["model.generate"]), statistics.median(rows["engine"])

    def batched(users: int) -> float:
        start = time.perf_counter()
        streams = [engine.submit(chats[i % len(chats)], page_default if i % 2 else params) for i in range(users)]
        for stream in streams:
            stream.result()
        return sum(s.stats.tokens for s in streams) / (time.perf_counter() - start)

    batch8 = statistics.median(batched(8) for _ in range(args.repeats))
    one_at_a_time = Engine(runner, max_batch=1, cache_size=0).start()
    engine.shutdown()
    engine = one_at_a_time
    batch1 = statistics.median(batched(8) for _ in range(args.repeats))
    engine.shutdown()

    print(f"model {loaded.description}, {args.new_tokens} new tokens, greedy, median of {args.repeats}\n")
    print("| concurrency 1 | tokens/s |")
    print("|---|---:|")
    print(f"| model.generate | {generate:.0f} |")
    print(f"| engine | {served:.0f} ({100 * (served / generate - 1):+.0f}%) |")
    print(f"\nengine alone, 8 requests at once (half greedy, half sampled at 0.7): max-batch 8 {batch8:.0f} tokens/s, max-batch 1 {batch1:.0f} "
          f"tokens/s ({batch8 / batch1:.1f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
