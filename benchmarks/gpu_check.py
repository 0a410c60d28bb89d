"""The GPU check of issue 21: is the captured engine right and fast? Answers in at most 8 minutes.

    bash benchmarks/gpu_check.sh                 # on a lent GPU (installs .whl/ first); files in $OUT
    python benchmarks/gpu_check.py --reduced     # the same stages at toy size on a CPU

Stages, in this order, each with its own time limit, each in a process of its own (forked
from this one, so the imports are paid once) that writes `$OUT/<n>-<stage>.json` as it goes:
  1 capture  the published 4.6 shape in bf16: captured decode steps against eager on the same
             batch for 32 steps (a join, a leave that moves a row, a row crossing the first
             length bucket): logit difference, argmax, finiteness per step; no empty graph;
             floor: >= 95% of rows equal eager at every step.
  2 bnb      int4 (nf4, double quant) captured against eager at 1 and 8 rows; int8 runs eager,
             says so once at start-up, and answers.
  3 memory   the engine's budget, its slots and graph pool, mem_get_info after start, the peak
             of a 64-request burst.
  4 speed    graphs first: 1, 8, 64 image requests (half sampled) against eager and against
             --max-batch 1; one stream beside model.generate and the bandwidth bound; TTFT.
             Floors (H100, bf16): one stream >= 150 tokens/s; 64 requests >= 3,000 tokens/s
             with TTFT p50 <= 500 ms.
  5 v25      benchmarks/gpu_v25.py (MiniCPM-Llama3-V 2.5 int4 under a 24 GB cap) if present.
A stage that outlives its limit is killed and its file marked `timeout` (what it measured stays);
a CUDA error that kills a stage's process leaves the next stages a fresh one. `summary.json`
lists every stage's status and checks, rewritten after each stage.

Forking after CUDA was initialised would leave the stages without it, so this process never
touches CUDA, and torch is told to ask NVML, not CUDA, whether a GPU is there (an import that
asks would otherwise initialise CUDA). Should a forked stage still find CUDA unusable, it and
the stages after it run in fresh interpreters instead (spawn: each pays its imports again).
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import engine_surface as surface  # noqa: E402 - after the repository is on the path
from check_report import (ERROR, PASS, SKIPPED, TIMEOUT, StageReport, machine, package_versions,  # noqa: E402
                          read_stage, utc_now, write_json)
from engine_bench import say  # noqa: E402

# The whole check, from the shell script's start: the 8 minutes.
TOTAL_S = 480.0
# A stage is not started with less than this left: it could not even build its model.
MIN_STAGE_S = 20.0


@dataclass(frozen=True)
class Stage:
    index: int
    name: str
    title: str
    limit_s: float | None  # None: whatever time is left
    run: Callable  # (config, report) or, for the last, (config, report, limit_s)

    @property
    def file(self) -> str:
        return f"{self.index}-{self.name}.json"


def stages() -> list[Stage]:
    import gpu_stages as s

    return [Stage(1, "capture", "captured decode steps equal eager ones", 90, s.stage_capture),
            Stage(2, "bnb", "bitsandbytes int4 captured, int8 eager", 110, s.stage_bnb),
            Stage(3, "memory", "budget, slots, graph pool, burst peak", 60, s.stage_memory),
            Stage(4, "speed", "tokens/s and TTFT, graphs against eager and --max-batch 1", 170, s.stage_speed),
            Stage(5, "v25", "MiniCPM-Llama3-V 2.5 int4 under a 24 GB cap", None, s.stage_v25)]


def run_stage(stage: Stage, config, limit_s: float, context: dict) -> None:
    """The stage's process: its file, the machine it ran on, its result or its error."""
    unusable = cuda_unusable(config.device)
    report = StageReport(config.out / stage.file, stage.index, stage.name, stage.title, limit_s,
                         {**context, "machine": None if unusable else machine(config.device)})
    if unusable:
        report.data["cuda_unusable"] = unusable
        report.finish(ERROR, error=f"CUDA cannot start in this process: {unusable}")
        os._exit(3)
    try:
        if stage.limit_s is None:
            stage.run(config, report, limit_s)
        else:
            stage.run(config, report)
        if report.data["status"] == "running":
            report.finish()
    except BaseException as exc:  # noqa: BLE001 - the stage's file must say what went wrong
        report.finish(ERROR, error=f"{type(exc).__name__}: {exc}\n{traceback.format_exc()[-4000:]}")
        sys.stdout.flush()
        os._exit(1)
    sys.stdout.flush()


def cuda_unusable(device: str) -> str | None:
    """Why CUDA cannot run here (say, a process forked after CUDA started), else None."""
    if not device.startswith("cuda"):
        return None
    import torch

    try:
        torch.zeros(1, device=device).add_(1)
        torch.cuda.synchronize()
    except RuntimeError as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


def supervise(stage: Stage, config, limit_s: float, context: dict, method: str = "fork") -> dict:
    """Run `stage` in a process of its own (`method`: fork or spawn) for at most `limit_s`; return
    its file's contents, marked `timeout` (killed) or `error` (its process died without saying why)
    where it did not end."""
    process = multiprocessing.get_context(method).Process(target=run_stage, args=(stage, config, limit_s, context),
                                                         name=f"gpu-check-{stage.name}")
    process.start()
    process.join(limit_s)
    killed = process.is_alive()
    if killed:
        process.kill()
        process.join()
    path = config.out / stage.file
    data = read_stage(path) or {"stage": stage.name, "index": stage.index, "title": stage.title, "checks": [],
                                "results": {}, "notes": [], **context}
    if killed or data.get("status") in (None, "running"):
        data["status"] = TIMEOUT if killed else ERROR
        data.setdefault("notes", []).append(f"killed at its limit of {limit_s:.0f} s" if killed
                                            else f"its process ended with exit code {process.exitcode}")
        data["limit_s"] = round(limit_s, 1)
        write_json(path, data)
        say(f"{stage.name}: {data['status']} ({data['notes'][-1]})")
    return data


def attempt(stage: Stage, config, deadline: float, context: dict, method: str) -> dict:
    """Run `stage` within its own limit and the time left before `deadline`; skip it if too little is left."""
    left = deadline - time.perf_counter()
    if left < MIN_STAGE_S:
        return skip(stage, config, f"no time left ({left:.0f} s)", context)
    limit = min(stage.limit_s or left, left)
    say(f"{stage.name}: {stage.title} (limit {limit:.0f} s)")
    return supervise(stage, config, limit, context, method)


def skip(stage: Stage, config, why: str, context: dict) -> dict:
    data = {"stage": stage.name, "index": stage.index, "title": stage.title, "status": SKIPPED,
            "started_at": utc_now(), **context, "checks": [], "results": {}, "notes": [why]}
    write_json(config.out / stage.file, data)
    say(f"{stage.name}: skipped ({why})")
    return data


def write_summary(config, started_at: str, total_s: float, done: list[dict]) -> None:
    write_json(config.out / "summary.json", {
        "started_at": started_at, "reduced": config.reduced, "device": config.device, "dtype": config.dtype,
        "total_limit_s": total_s, "versions": package_versions(),
        "stages": [{"index": d.get("index"), "stage": d.get("stage"), "status": d.get("status"),
                    "elapsed_s": d.get("elapsed_s"), "limit_s": d.get("limit_s"), "notes": d.get("notes", []),
                    "checks": d.get("checks", []), "machine": d.get("machine")} for d in done]})


def preload() -> None:
    """Import what every stage needs once, here, before forking: each stage then starts at once.
    Nothing here may touch CUDA (a forked process cannot use a CUDA context made before the fork)."""
    import transformers  # noqa: F401
    from transformers import MiniCPMV4_6ForConditionalGeneration  # noqa: F401

    import gpu_stages  # noqa: F401
    import minicpmv_demo.engine  # noqa: F401
    import minicpmv_demo.model.minicpmv4.published_shape  # noqa: F401
    from minicpmv_demo.model import load_model  # noqa: F401


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reduced", action="store_true", help="toy sizes on the CPU (the built-in tiny model)")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or "benchmarks/results/gpu-check"),
                        help="where the stage files go (default: $OUT, else benchmarks/results/gpu-check)")
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/gpu-check"),
                        help="checkpoints built for the check (the tiny model, the published shape for bnb)")
    parser.add_argument("--stages", default="1,2,3,4,5", help="which stages, e.g. 1,4")
    parser.add_argument("--total-s", type=float, default=TOTAL_S, help="seconds for all stages together")
    parser.add_argument("--device", default="", help="default: cuda, or cpu with --reduced")
    parser.add_argument("--dtype", default="", help="default: bfloat16, or float32 with --reduced")
    parser.add_argument("--device-map", default="auto", help="for the bitsandbytes loads, as the app's flag")
    parser.add_argument("--bandwidth-gbs", type=float, default=0.0, help="default: looked up by GPU name")
    parser.add_argument("--v25-args", default="", help="extra flags for benchmarks/gpu_v25.py")
    parser.add_argument("--start-method", choices=("fork", "spawn"), default="fork",
                        help="how stages start: fork (imports paid once) or spawn (a fresh interpreter each)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    from gpu_stages import CheckConfig

    args = parse_args(argv)
    os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")  # asking whether a GPU is there must not start CUDA
    os.environ.setdefault("BENCH_STARTED_AT", str(time.time()))  # spawned stages count their seconds from here
    started, started_at = time.perf_counter(), utc_now()
    options = {k: v for k, v in {"device": args.device, "dtype": args.dtype}.items() if v}
    config = CheckConfig.make(args.out.resolve(), args.work_dir.resolve(), args.reduced, device_map=args.device_map,
                              bandwidth_gbs=args.bandwidth_gbs, v25_args=args.v25_args, **options)
    config.out.mkdir(parents=True, exist_ok=True)
    config.work_dir.mkdir(parents=True, exist_ok=True)
    context = {"reduced": config.reduced, "device": config.device, "dtype": config.dtype,
               "versions": package_versions()}
    say(f"gpu check: {'reduced, ' if config.reduced else ''}{config.device}, {config.dtype}, stages {args.stages}, "
        f"{args.total_s:.0f} s in all, files in {config.out}; {context['versions']}")
    preload()
    wanted = {int(s) for s in args.stages.split(",") if s}
    deadline = started + args.total_s
    done: list[dict] = []
    method = args.start_method
    for stage in (s for s in stages() if s.index in wanted):
        data = attempt(stage, config, deadline, context, method)
        if data.get("cuda_unusable") and method == "fork":
            say(f"{stage.name}: CUDA is unusable in a forked process; this stage and the rest run spawned")
            method = "spawn"
            data = attempt(stage, config, deadline, context, method)
        done.append(data)
        write_summary(config, started_at, args.total_s, done)
    for leftover in config.out.glob(".*.part"):  # a stage killed mid-write
        leftover.unlink()
    say("| stage | status | seconds | failed checks |")
    for data in done:
        failed = [c["name"] for c in data.get("checks", []) if c.get("ok") is False]
        say(f"| {data['index']} {data['stage']} | {data['status']} | {data.get('elapsed_s', '-')} | "
            f"{'; '.join(failed) or '-'} |")
    return 0 if all(d["status"] in (PASS, SKIPPED) for d in done) else 1


if __name__ == "__main__":
    sys.exit(main())
