"""Concurrency benchmark: the real app, real gradio_client users, --max-batch 1 vs batched.

For each engine setting it launches `app.py` as its own process (loopback only), then for N in
1, 2, 4, 8, 16 concurrent users has each user send a few requests back to back (mixed example
images and prompts, greedy) and measures aggregate tokens/s, time to first token and latency (p50/p95), and the
server's peak memory. It also checks that every concurrent reply equals the reply that request
gets alone (no cross-talk), and measures time to first token for a request that arrives while
4 others are mid-way through 256-token answers.

    python benchmarks/concurrency.py                      # tiny model on the CPU
    python benchmarks/concurrency.py --model tiny-2.5 --tag cpu-tiny-v25   # the tiny MiniCPM-V 2.5
    python benchmarks/concurrency.py --model openbmb/MiniCPM-V-4.6 --dtype bfloat16 --users 1 8 32

Prints a Markdown table, saves JSON and a PNG plot under benchmarks/results/.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
from gradio_client import Client, handle_file
from gradio_client.client import Job

ROOT = Path(__file__).resolve().parent.parent
ASSETS = ROOT / "assets"
RESULTS = ROOT / "benchmarks" / "results"
TINY_V25 = "tiny-2.5"
# Questions whose greedy replies from the tiny model (random weights) run to the token limit
# (checked up to 256 tokens; the tiny 2.5's past 190): a reply that ends at an early EOS would
# make the run measure per-request overhead instead of decoding. Re-check them when a tiny
# model's recipe changes.
PROMPTS = [
    ("Tell me about this image.", "scene.png"),
    ("Describe the chart.", "chart.png"),
    ("Read the receipt.", "receipt.png"),
    ("Describe the diagram in detail.", "diagram.png"),
]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    """`app.py` in a child process on a loopback port; watches its memory while it runs."""

    def __init__(self, args: argparse.Namespace, max_batch: int) -> None:
        self.port = free_port()
        command = [sys.executable, str(ROOT / "app.py"), "--model", args.model, "--max-batch", str(max_batch),
                   "--port", str(self.port), "--cache-size", "0", "--max-new-tokens", "1024",
                   "--stream-interval", str(args.stream_interval), "--max-stream-updates",
                   str(args.max_stream_updates), "--concurrency", "64"]
        if args.dtype:
            command += ["--dtype", args.dtype]
        if args.quant:
            command += ["--quant", args.quant]
        if args.torch_threads:
            command += ["--torch-threads", str(args.torch_threads)]
        env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False"}
        self.process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.PIPE, text=True)
        self.url = f"http://127.0.0.1:{self.port}/"
        self.peak_rss_mb = 0.0
        self._stop = threading.Event()

    def __enter__(self) -> Server:
        deadline = time.time() + 600
        while time.time() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"app exited: {self.process.stderr.read()[-2000:]}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    break
            except OSError:
                time.sleep(0.5)
        # ssl_verify=False: plain http on loopback; otherwise every upload builds a TLS context,
        # and the client, not the server, becomes what the benchmark measures.
        self.client = Client(self.url, verbose=False, ssl_verify=False)
        threading.Thread(target=self._watch_memory, daemon=True).start()
        return self

    def _watch_memory(self) -> None:
        proc = psutil.Process(self.process.pid)
        while not self._stop.is_set():
            try:
                self.peak_rss_mb = max(self.peak_rss_mb, proc.memory_info().rss / 2**20)
            except psutil.Error:
                return
            time.sleep(0.05)

    def gpu_memory_mb(self) -> float | None:
        """The app's own /gpu_memory view: GPU memory used, when a GPU is there."""
        try:
            snapshot = self.client.predict(api_name="/gpu_memory")
        except Exception:  # noqa: BLE001 - older builds have no such endpoint
            return None
        gpus = snapshot.get("gpus") or []
        return sum(g["memory_used_mb"] for g in gpus) if gpus else None

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self.client.close()
        self.process.terminate()
        self.process.wait(30)


def one_request(client: Client, prompt: tuple[str, str], max_new_tokens: int) -> dict:
    text, image = prompt
    start = time.perf_counter()
    job = client.submit(message={"text": text, "files": [handle_file(str(ASSETS / image))]}, history=[],
                        max_new_tokens=max_new_tokens, temperature=0.0, top_p=1.0, api_name="/chat")
    first = None
    for _ in outputs_of(job):
        first = time.perf_counter() - start
        break
    reply = job.result()
    latency = time.perf_counter() - start
    return {"reply": reply, "ttft": first if first is not None else latency, "latency": latency}


def outputs_of(job: Job, every: float = 0.005) -> Iterator[str]:
    """The job's streamed outputs as they arrive, looked at every 5 ms. (Iterating a job looks
    every 1 ms: eight such clients take CPU from the server they measure on a small machine.)"""
    seen = 0
    while True:
        done = job.done()
        outputs = list(job.outputs())  # a copy: the client appends to its own list meanwhile
        yield from outputs[seen:]
        seen = len(outputs)
        if done:
            return
        time.sleep(every)


def run_users(server: Server, users: int, max_new_tokens: int, count_tokens, rounds: int) -> dict:
    """`users` users, each sending `rounds` requests back to back (a closed loop, as real users
    who read an answer and ask again): the server always has about `users` requests in flight."""
    results: list[dict] = [{}] * (users * rounds)

    def user(i: int) -> None:
        for r in range(rounds):
            k = r * users + i
            results[k] = one_request(server.client, PROMPTS[k % len(PROMPTS)], max_new_tokens)

    start = time.perf_counter()
    threads = [threading.Thread(target=user, args=(i,)) for i in range(users)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - start
    tokens = sum(count_tokens(r["reply"]) for r in results)
    return {
        "users": users,
        "tokens_per_s": tokens / wall,
        "ttft_p50": percentile([r["ttft"] for r in results], 50),
        "ttft_p95": percentile([r["ttft"] for r in results], 95),
        "latency_p50": percentile([r["latency"] for r in results], 50),
        "latency_p95": percentile([r["latency"] for r in results], 95),
        "replies": [r["reply"] for r in results],
    }


def ttft_under_load(server: Server, long_tokens: int = 256) -> dict:
    """TTFT of a newcomer while 4 others are about half-way through long answers, vs idle."""
    idle = statistics.median(one_request(server.client, PROMPTS[3], 8)["ttft"] for _ in range(5))
    progress, finished = [0] * 4, [False] * 4

    def long_user(i: int) -> None:
        text, image = PROMPTS[i]
        job = server.client.submit(message={"text": text, "files": [handle_file(str(ASSETS / image))]},
                                   history=[], max_new_tokens=long_tokens, temperature=0.0, top_p=1.0,
                                   api_name="/chat")
        for partial in outputs_of(job):
            progress[i] = len(partial.split())
        job.result()
        finished[i] = True  # a reply may end (EOS) before half-way: it must not be waited for

    threads = [threading.Thread(target=long_user, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    while not all(done or words >= long_tokens // 2 for words, done in zip(progress, finished)):
        time.sleep(0.001)
    loaded = one_request(server.client, PROMPTS[3], 8)["ttft"]
    others_done = all(finished)
    for thread in threads:
        thread.join()
    return {"idle_ttft": idle, "loaded_ttft": loaded, "ratio": loaded / idle,
            "others_still_running": not others_done}


def percentile(values: list[float], pct: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(pct / 100 * (len(ordered) - 1))))
    return ordered[index]


def served_model(model: str) -> str:
    """What `--model` the app gets: "tiny-2.5" is the tiny MiniCPM-V 2.5 checkpoint's folder (built
    first if missing); anything else as given."""
    if model != TINY_V25:
        return model
    from minicpmv_demo.model.minicpmv2.tiny import ensure_tiny_v25

    return str(ensure_tiny_v25())


def token_counter(model: str):
    """Count reply tokens with the served model's own tokenizer (2.5 / 2.6: read as the app reads it)."""
    from transformers import AutoTokenizer

    from minicpmv_demo.model.minicpmv2 import checkpoint_version, load_tokenizer

    if model in ("tiny", "auto"):
        from minicpmv_demo.model.minicpmv4.tiny import ensure_tiny_model

        model = str(ensure_tiny_model())
    try:
        checkpoint_version(model)
        tokenizer = load_tokenizer(model)
    except (ValueError, OSError):  # not MiniCPM-V 2.x
        tokenizer = AutoTokenizer.from_pretrained(model)
    return lambda text: len(tokenizer(text, add_special_tokens=False)["input_ids"])


def plot(runs: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for label, rows in runs.items():
        users = [r["users"] for r in rows]
        left.plot(users, [r["tokens_per_s"] for r in rows], marker="o", label=label)
        right.plot(users, [r["latency_p95"] for r in rows], marker="o", label=label)
    for axis, title in ((left, "aggregate tokens/s"), (right, "latency p95 (s)")):
        axis.set_xscale("log", base=2)
        axis.set_xlabel("concurrent users")
        axis.set_title(title)
        axis.grid(alpha=0.3)
        axis.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny", help=f"what app.py serves; '{TINY_V25}': the tiny MiniCPM-V 2.5")
    parser.add_argument("--dtype", default="")
    parser.add_argument("--quant", default="")
    parser.add_argument("--torch-threads", type=int, default=0,
                        help=f"the app's --torch-threads (0: its auto; '{TINY_V25}' gets 1, as the app gives its "
                             "built-in tiny model)")
    parser.add_argument("--users", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    parser.add_argument("--batched", type=int, default=8, help="--max-batch of the batched run")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=6, help="requests each user sends, one after another")
    parser.add_argument("--stream-interval", type=float, default=0.03)
    parser.add_argument("--max-stream-updates", type=float, default=100.0,
                        help="the app's budget of streamed updates per second (0 = none)")
    parser.add_argument("--tag", default="cpu-tiny", help="name of the result files")
    args = parser.parse_args()
    if args.model == TINY_V25:
        args.torch_threads = args.torch_threads or 1  # a toy model's ops are too small to split
    args.model = served_model(args.model)

    RESULTS.mkdir(parents=True, exist_ok=True)
    count_tokens = token_counter(args.model)
    runs: dict[str, list[dict]] = {}
    memory: dict[str, dict] = {}
    extra: dict[str, dict] = {}
    reference: list[str] = []
    mismatches = 0
    for label, max_batch in (("max-batch 1", 1), (f"max-batch {args.batched}", args.batched)):
        with Server(args, max_batch) as server:
            # The same unmeasured warm-up for both engines: each prompt alone (its pictures enter
            # the caches), then one burst at the largest concurrency (first-time tensor shapes).
            # The first server's replies alone are the reference every other reply must equal.
            alone = [one_request(server.client, p, args.max_new_tokens)["reply"] for p in PROMPTS]
            reference = reference or alone
            mismatches += sum(reply != expected for reply, expected in zip(alone, reference, strict=True))
            run_users(server, max(args.users), args.max_new_tokens, count_tokens, 1)
            runs[label] = [run_users(server, n, args.max_new_tokens, count_tokens, args.rounds)
                           for n in args.users]
            if max_batch > 1:
                extra["ttft_under_load"] = ttft_under_load(server)
            memory[label] = {"peak_rss_mb": server.peak_rss_mb, "gpu_used_mb": server.gpu_memory_mb()}

    mismatches += sum(reply != reference[i % len(PROMPTS)] for rows in runs.values()
                      for row in rows for i, reply in enumerate(row["replies"]))
    print_table(runs, memory, args)
    batched_label = f"max-batch {args.batched}"
    at8 = {label: next((r for r in rows if r["users"] == 8), None) for label, rows in runs.items()}
    summary = {"cross_talk_mismatches": mismatches, **extra}
    if all(at8.values()):
        summary["speedup_at_8_users"] = at8[batched_label]["tokens_per_s"] / at8["max-batch 1"]["tokens_per_s"]
    print()
    for key, value in summary.items():
        print(f"{key}: {json.dumps(value, default=float)}")
    for rows in runs.values():
        for row in rows:
            row.pop("replies")
    (RESULTS / f"{args.tag}.json").write_text(json.dumps({"args": vars(args), "runs": runs, "memory": memory,
                                                          "summary": summary}, indent=2))
    plot(runs, RESULTS / f"{args.tag}.png")
    print(f"\nsaved {RESULTS / (args.tag + '.json')} and {RESULTS / (args.tag + '.png')}")
    return 0


def print_table(runs: dict, memory: dict, args: argparse.Namespace) -> None:
    print(f"\nmodel {args.model} {args.dtype or ''} {args.quant or ''} · {args.max_new_tokens} new tokens, greedy\n")
    print("| engine | users | tokens/s | TTFT p50 | TTFT p95 | latency p50 | latency p95 | peak RSS | GPU used |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for label, rows in runs.items():
        mem = memory[label]
        gpu = f"{mem['gpu_used_mb']:,.0f} MB" if mem["gpu_used_mb"] else "-"
        for row in rows:
            print(f"| {label} | {row['users']} | {row['tokens_per_s']:.0f} | {row['ttft_p50'] * 1000:.0f} ms | "
                  f"{row['ttft_p95'] * 1000:.0f} ms | {row['latency_p50']:.2f} s | {row['latency_p95']:.2f} s | "
                  f"{mem['peak_rss_mb']:,.0f} MB | {gpu} |")


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main())
