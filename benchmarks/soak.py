"""Soak test: many simulated users for a few minutes, loopback only, bounded in time and count.

Users send a mix of valid requests, bad uploads, cancellations and abandoned streams, and with
`--hostile` the cases of hostile.py through the OpenAI route (a 4xx with a message is a
rejection; a 5xx or a dropped connection is lost). The report
counts requests sent, completed, rejected with a clear message, cancelled, abandoned, and lost
(anything else: must be 0), the p95 latency, and the server's memory and thread count before
and after (they must not keep growing).

    python benchmarks/soak.py --users 64 --duration 180          # launches the tiny-model app
    python benchmarks/soak.py --url http://127.0.0.1:7860/ --pid 1234
    python benchmarks/soak.py --users 8 --duration 600 --rounds 5000 --hostile

Exits non-zero when a request was lost, the engine did not go idle, or threads grew per request.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import socket
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psutil
from gradio_client import Client, handle_file

from hostile import Battery, send_case

ROOT = Path(__file__).resolve().parent.parent
ASSETS = ROOT / "assets"
IMAGES = ["chart.png", "receipt.png", "diagram.png", "scene.png"]
PROMPTS = ["What is this?", "Describe the picture.", "List what you see.", "What is the total?"]
# Messages the app gives for bad input: a rejection that says one of these is "clear".
CLEAR_MESSAGES = ("not an image", "damaged or truncated", "too many to open", "is empty", "Please type a question",
                  "Too many images", "the limit is", "busy")
MAX_REQUESTS_PER_USER = 400


@dataclass
class Report:
    outcomes: Counter = field(default_factory=Counter)
    latencies: list[float] = field(default_factory=list)
    lost: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, outcome: str, latency: float | None = None, detail: str = "") -> None:
        with self.lock:
            self.outcomes[outcome] += 1
            if latency is not None:
                self.latencies.append(latency)
            if outcome == "lost":
                self.lost.append(detail[:200])


def bad_files(folder: Path) -> list[Path]:
    """A few broken uploads, made here."""
    folder.mkdir(parents=True, exist_ok=True)
    text = folder / "notes.png"
    text.write_text("not a picture at all")
    cut = folder / "cut.png"
    cut.write_bytes((ASSETS / "chart.png").read_bytes()[:800])
    empty = folder / "empty.jpg"
    empty.write_bytes(b"")
    return [text, cut, empty]


def message(rng: random.Random, files: list[str | Path]) -> dict:
    return {"text": rng.choice(PROMPTS), "files": [handle_file(str(f)) for f in files]}


def user(index: int, url: str, deadline: float, rounds: int, report: Report, broken: list[Path],
         hostile: Battery | None = None) -> None:
    """One person with one browser session (its own client), asking `rounds` times or until the
    time is up. Each user's requests are drawn from its own seed: with a fixed number of rounds
    the mix is the same on any machine."""
    rng = random.Random(index)
    client = Client(url, verbose=False, ssl_verify=False)
    try:
        ask_until(rng, url, client, deadline, rounds, report, broken, hostile)
    finally:
        client.close()


def ask_until(rng: random.Random, url: str, client: Client, deadline: float, rounds: int, report: Report,
              broken: list[Path], hostile: Battery | None = None) -> None:
    for _ in range(rounds):
        if time.monotonic() >= deadline:
            return
        kind = rng.choices(["valid", "bad", "cancel", "abandon", "hostile"],
                           weights=[60, 15, 15, 10, 15 if hostile else 0])[0]
        if kind == "hostile":
            send_hostile(hostile, rng, url, report)
            continue
        files = [rng.choice(broken)] if kind == "bad" else [ASSETS / rng.choice(IMAGES)]
        kwargs = {"message": message(rng, files), "history": [], "max_new_tokens": rng.randint(8, 96),
                  "temperature": rng.choice([0.0, 0.7]), "top_p": 0.9, "api_name": "/chat"}
        started = time.monotonic()
        try:
            if kind in ("abandon", "cancel"):
                leave(url, kwargs, cancel=kind == "cancel")
                report.add("abandoned" if kind == "abandon" else "cancelled")
                continue
            reply = client.submit(**kwargs).result(timeout=120)
            if kind == "bad":
                report.add("lost", detail=f"bad upload answered: {reply[:60]!r}")
            else:  # an empty reply is an answer too: the model may say end-of-text first
                report.add("completed", time.monotonic() - started)
        except Exception as exc:  # noqa: BLE001 - every outcome is counted
            text = str(exc)
            if any(clear in text for clear in CLEAR_MESSAGES):
                report.add("rejected", time.monotonic() - started)
            else:
                report.add("lost", detail=f"{kind}: {type(exc).__name__}: {text}")


def send_hostile(battery: Battery, rng: random.Random, url: str, report: Report) -> None:
    """One of hostile.py's cases: refused with a message, or answered; anything else is lost."""
    started = time.monotonic()
    with httpx.Client(timeout=120) as client:
        name, outcome = send_case(battery, rng, client, url)
    if outcome == "answered":
        report.add("completed", time.monotonic() - started)
    elif outcome == "refused":
        report.add("rejected", time.monotonic() - started)
    else:
        report.add("lost", detail=f"hostile {name}: {outcome}")


def leave(url: str, kwargs: dict, cancel: bool) -> None:
    """A reply left mid-answer from a client of its own: cancelled (`cancel`), or its tab closed
    without a word. Of its own, because after a job cancelled mid-stream, gradio_client sometimes
    ends the same client's next job with a CancelledError of its own making (3 in 12,875 requests
    of a 15-minute soak; the server never cancelled them)."""
    client = Client(url, verbose=False, ssl_verify=False)
    try:
        job = client.submit(**kwargs)
        for _partial in job:
            if cancel:
                job.cancel()
            break
    finally:
        client.close()


def server_state(pid: int) -> dict:
    process = psutil.Process(pid)
    return {"rss_mb": round(process.memory_info().rss / 2**20, 1), "threads": process.num_threads()}


def run(url: str, pid: int, users: int, duration: float, scratch: Path,
        rounds: int = MAX_REQUESTS_PER_USER, hostile: bool = False) -> dict:
    """Load the app for `duration` seconds, or until each user made `rounds` requests."""
    broken = bad_files(scratch)
    battery = Battery(scratch / "hostile") if hostile else None
    client = Client(url, verbose=False, ssl_verify=False)
    client.predict(message=message(random.Random(0), [ASSETS / "scene.png"]), history=[], max_new_tokens=8,
                   temperature=0.0, top_p=1.0, api_name="/chat")  # warm-up
    before = server_state(pid)
    report = Report()
    deadline = time.monotonic() + duration
    client.close()
    threads = [threading.Thread(target=user, args=(i, url, deadline, rounds, report, broken, battery), daemon=True)
               for i in range(users)]
    for thread in threads:
        thread.start()
    memory = watch_memory(pid, lambda: time.monotonic() >= deadline or not any(t.is_alive() for t in threads),
                          min(duration / 4, 5.0))
    for thread in threads:
        thread.join(duration + 180)
    settled = wait_settled(url)
    after = server_state(pid)
    latencies = sorted(report.latencies)
    p95 = latencies[int(0.95 * (len(latencies) - 1))] if latencies else 0.0
    return {"users": users, "duration_s": duration, "sent": sum(report.outcomes.values()),
            **{k: report.outcomes.get(k, 0) for k in ("completed", "rejected", "cancelled", "abandoned", "lost")},
            "p95_latency_s": round(p95, 3), "server_before": before, "server_after": after,
            "rss_mb_during_load": memory,
            "settled": settled, "lost_details": report.lost[:10]}


def watch_memory(pid: int, done, every: float) -> list[float]:
    """The server's memory every `every` seconds of the load, until `done()`: warm caches level
    off, a leak keeps rising."""
    samples = []
    stop = threading.Event()
    while not done():
        stop.wait(every)
        samples.append(server_state(pid)["rss_mb"])
    return samples


def wait_settled(url: str, timeout: float = 30.0) -> bool:
    """After the load the engine must be idle: no stuck rows, nothing left waiting."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        health = httpx.get(f"{url}health", timeout=10).json()
        if health["queue_depth"] == 0 and health["batch_size"] == 0 and health["engine_alive"]:
            return True
        time.sleep(0.5)
    return False


def leaked(result: dict) -> bool:
    """Threads may grow into Gradio's worker pool (about one per concurrent user), never with the
    number of requests."""
    growth = result["server_after"]["threads"] - result["server_before"]["threads"]
    return growth > result["users"] + 16


@contextmanager
def launched_app(concurrency: int, tiny_model_dir: str = "",
                 extra_args: tuple[str, ...] = ()) -> Iterator[tuple[str, int]]:
    """The tiny-model app in its own process (so its memory and threads are its own), on loopback,
    with an upload folder of its own: Gradio names uploads by content, so apps sharing /tmp/gradio
    (other test runs on the machine) delete each other's copies of the same picture on closing."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [sys.executable, str(ROOT / "app.py"), "--model", "tiny", "--port", str(port),
               "--max-new-tokens", "128", "--concurrency", str(concurrency)]
    if tiny_model_dir:
        command += ["--tiny-model-dir", tiny_model_dir]
    command += extra_args
    uploads = tempfile.mkdtemp(prefix="minicpmv-uploads-")
    server = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              env={**os.environ, "GRADIO_TEMP_DIR": uploads})
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and server.poll() is None:
            try:
                if httpx.get(f"{url}health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.5)
        else:
            raise RuntimeError("the app did not start")
        yield url, server.pid
    finally:
        server.terminate()
        server.wait(30)
        shutil.rmtree(uploads, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=64)
    parser.add_argument("--duration", type=float, default=180.0, help="seconds of load (at most 900)")
    parser.add_argument("--url", default="", help="a running app (loopback); default: launch one")
    parser.add_argument("--pid", type=int, default=0, help="the running app's process id")
    parser.add_argument("--rounds", type=int, default=MAX_REQUESTS_PER_USER, help="most requests per user")
    parser.add_argument("--hostile", action="store_true", help="mix hostile.py's cases in (OpenAI route)")
    args = parser.parse_args()
    duration = min(args.duration, 900.0)
    scratch = Path(os.environ.get("TMPDIR", "/tmp")) / "minicpmv-soak"
    if args.url:
        print(json.dumps(run(args.url, args.pid, args.users, duration, scratch, args.rounds, args.hostile), indent=2))
        return 0
    with launched_app(args.users) as (url, pid):
        result = run(url, pid, args.users, duration, scratch, args.rounds, args.hostile)
    print(json.dumps(result, indent=2))
    return 0 if result["lost"] == 0 and result["settled"] and not leaked(result) else 1


if __name__ == "__main__":
    sys.exit(main())
