"""Where a decode step's time goes: torch.profiler over decode steps at batch 1, 8 and 64.

    python benchmarks/profile_step.py                        # the tiny model, CPU
    python benchmarks/profile_step.py --published --text-layers 4 --vision-layers 1   # CPU, reduced
    python benchmarks/profile_step.py --published --device cuda --dtype bfloat16      # a lent GPU

For each batch size and each way of holding the running rows (`dynamic`: one transformers cache
that every join concatenates and every leave `index_select`s, as before the slots; `slots`: the
preallocated slots; `graphs`: the slots with captured decode steps, CUDA only), it prints per
decode step: wall time, aten calls, kernel launches and host syncs (CUDA), and the most frequent
aten ops; and what one join plus one leave costs at that batch size.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import Counter
from pathlib import Path

import torch

from engine_bench import ROOT, say, synchronize

SYNC_EVENTS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "aten::_local_scalar_dense")
LAUNCH_EVENTS = ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC", "cudaGraphLaunch")


def build_runner(args):
    if args.published:
        from minicpmv_demo.model.minicpmv4.published_shape import random_published_runner

        runner, params, _ = random_published_runner(args.device, getattr(torch, args.dtype), args.text_layers,
                                                    args.vision_layers)
        say(f"published shape, random weights: {params / 1e9:.2f} B parameters "
            f"({len(runner.model.config.text_config.layer_types)} text layers), {args.dtype} on {args.device}")
        return runner
    from minicpmv_demo.model import load_model
    from minicpmv_demo.config.settings import Settings

    loaded = load_model(Settings(model="tiny"))
    say("the built-in tiny model, CPU")
    return loaded.runner


def running_batch(runner, path: str, size: int, prompt):
    """`size` rows of `prompt`, prefilled and decoding, held the `path` way; and their last tokens."""
    newcomer, logits = runner.prefill([prompt] * size, [[]] * size)
    if path == "dynamic":
        batch = newcomer
    else:
        batch = runner.new_slots(size + 1, prompt.length + 64, capture=path == "graphs")
        batch = runner.merge(batch, newcomer)
    return batch, logits.argmax(dim=-1)


def profile(runner, path: str, size: int, prompt, steps: int, device: str) -> dict:
    batch, tokens = running_batch(runner, path, size, prompt)
    for _ in range(2):  # warm: first calls allocate and pick kernels
        tokens = runner.step(batch, tokens).argmax(dim=-1)
    synchronize(device)
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.startswith("cuda"):
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    started = time.perf_counter()
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(steps):
            tokens = runner.step(batch, tokens).argmax(dim=-1)
        synchronize(device)
    profiled_ms = (time.perf_counter() - started) * 1000 / steps
    started = time.perf_counter()
    for _ in range(steps):
        tokens = runner.step(batch, tokens).argmax(dim=-1)
    synchronize(device)
    step_ms = (time.perf_counter() - started) * 1000 / steps
    names = Counter()
    for event in prof.events():
        names[event.name] += 1
    aten = {name: count for name, count in names.items() if name.startswith("aten::")}
    join_ms = join_leave_ms(runner, path, batch, size, prompt, device)
    return {"step_ms": step_ms, "profiled_ms": profiled_ms,
            "aten": sum(aten.values()) / steps,
            "launches": sum(names[n] for n in LAUNCH_EVENTS) / steps,
            "syncs": sum(names[n] for n in SYNC_EVENTS) / steps,
            "top": Counter(aten).most_common(8), "join_leave_ms": join_ms, "steps": steps}


def join_leave_ms(runner, path: str, batch, size: int, prompt, device: str, repeats: int = 3) -> float:
    """One newcomer (already prefilled) joins the batch, then the first row leaves: the cost of
    the bookkeeping alone, without the newcomer's prefill (best of `repeats`: the first touch of
    fresh memory is not the steady state)."""
    newcomer, _ = runner.prefill([prompt], [[]])
    keep = [size, *range(1, size)] if path != "dynamic" else list(range(1, size + 1))
    best = float("inf")
    for _ in range(repeats):
        synchronize(device)
        started = time.perf_counter()
        batch = runner.select(runner.merge(batch, newcomer), keep)
        synchronize(device)
        best = min(best, time.perf_counter() - started)
    return best * 1000


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--published", action="store_true", help="the published 1.3 B shape (random weights)")
    parser.add_argument("--text-layers", type=int, default=0, help="with --published: 0 = all 24")
    parser.add_argument("--vision-layers", type=int, default=1, help="with --published (decode never reads it)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="bfloat16" if torch.cuda.is_available() else "float32")
    parser.add_argument("--batches", default="1,8,64")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--paths", default="", help="dynamic,slots,graphs (default: graphs only on CUDA)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    if args.threads:
        torch.set_num_threads(args.threads)
    from minicpmv_demo.intake.conversation import Conversation, Turn

    runner = build_runner(args)
    prompt = runner.encode(Conversation(turns=(Turn("user", "Describe a busy street market at noon."),)))
    paths = args.paths.split(",") if args.paths else ["dynamic", "slots"] + (["graphs"] if "cuda" in args.device
                                                                               else [])
    device_name = torch.cuda.get_device_name() if "cuda" in args.device else f"CPU, {torch.get_num_threads()} threads"
    say(f"{device_name}; torch {torch.__version__}; prompt of {prompt.length} tokens")
    print("| path | batch | ms/step | tokens/s | aten calls/step | kernel launches/step | host syncs/step "
          "| join+leave ms |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    tops = []
    for size in (int(b) for b in args.batches.split(",")):
        for path in paths:
            result = profile(runner, path, size, prompt, args.steps, args.device)
            print(f"| {path} | {size} | {result['step_ms']:.1f} | {size * 1000 / result['step_ms']:,.0f} "
                  f"| {result['aten']:,.0f} | {result['launches']:,.0f} | {result['syncs']:,.0f} "
                  f"| {result['join_leave_ms']:.2f} |", flush=True)
            tops.append((path, size, result["top"], result["steps"]))
    for path, size, top, steps in tops:
        ops = ", ".join(f"{name.removeprefix('aten::')} {count / steps:,.0f}" for name, count in top)
        print(f"most frequent aten ops per step, {path} batch {size}: {ops}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
