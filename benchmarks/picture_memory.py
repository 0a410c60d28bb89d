"""Memory under a burst of large pictures: 16 users at once, each sending 4 pictures of 36 MP.

Launches the tiny-model app in its own process (loopback only), sends every request at the same
moment through `gradio_client`, samples the server's RSS every 0.1 s, and checks two floors:
the peak stays at most 1.5 GB above the baseline, and 30 s after the burst the server is back
within 15% of it (memory is given back, not kept by the allocator or by caches).

    python benchmarks/picture_memory.py                 # 16 requests x 4 pictures of 6000x6000

The pictures are generated into a temporary folder (a cheap-to-compress PNG pattern, about
1.5 MB each, well under the 20 MB upload limit), each one distinct so no cache hides the work.
Exits non-zero when a floor fails or a request gets no reply.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil
from gradio_client import Client, handle_file
from PIL import Image

from soak import ASSETS, launched_app

PEAK_FLOOR_MB = 1536.0  # at most 1.5 GB above the baseline at any moment
SETTLED_FLOOR = 0.15  # within 15% of the baseline once the burst is over
SETTLE_S = 30.0


def make_pictures(folder: Path, count: int, side: int) -> list[Path]:
    """`count` distinct side x side RGB PNGs: one smooth pattern (fast to write, small file) with
    each picture's number stamped into a corner block, so every file has its own content."""
    y, x = np.ogrid[:side, :side]
    channels = (x // 8 % 256, y // 8 % 256, (x + y) // 16 % 256)
    pattern = np.stack(np.broadcast_arrays(*channels), axis=-1).astype(np.uint8)
    paths = []
    for index in range(count):
        pixels = pattern.copy()
        pixels[:64, :64] = (index * 37 % 256, index * 91 % 256, index % 256)
        path = folder / f"picture-{index:03d}.png"
        Image.fromarray(pixels).save(path, compress_level=1)
        paths.append(path)
    return paths


class RssSampler:
    """The server's resident memory every `every` seconds, on its own thread, in MB."""

    def __init__(self, pid: int, every: float = 0.1) -> None:
        self._process = psutil.Process(pid)
        self._every = every
        self._stop = threading.Event()
        self.samples: list[tuple[float, float]] = []  # (monotonic time, MB)
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> RssSampler:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append((time.monotonic(), self._process.memory_info().rss / 2**20))
            time.sleep(self._every)

    def between(self, start: float, end: float) -> list[float]:
        return [mb for at, mb in self.samples if start <= at <= end]


def ask(text: str, pictures: list[Path]) -> dict:
    """The chat endpoint's arguments for one request: a few tokens, greedy."""
    return {"message": {"text": text, "files": [handle_file(str(p)) for p in pictures]}, "history": [],
            "max_new_tokens": 8, "temperature": 0.0, "top_p": 1.0, "api_name": "/chat"}


def burst(url: str, pictures: list[Path], per_request: int) -> list[str]:
    """Every request at once, each from its own client (as separate visitors); returns the errors."""
    groups = [pictures[i:i + per_request] for i in range(0, len(pictures), per_request)]
    clients = [Client(url, verbose=False, ssl_verify=False) for _ in groups]
    start = threading.Barrier(len(groups))
    errors: list[str] = []

    def send(client: Client, group: list[Path]) -> None:
        start.wait()
        try:
            client.predict(**ask("Describe these pictures.", group))
        except Exception as exc:  # noqa: BLE001 - every failure is reported
            errors.append(f"{type(exc).__name__}: {str(exc)[:200]}")

    threads = [threading.Thread(target=send, args=(c, g)) for c, g in zip(clients, groups, strict=True)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for client in clients:
        client.close()
    return errors


def measure(url: str, pid: int, pictures: list[Path], per_request: int) -> dict:
    """Baseline (warmed up, idle), peak during the burst and the settling time, and after 30 s."""
    warm = Client(url, verbose=False, ssl_verify=False)
    warm.predict(**ask("What is this?", [ASSETS / "scene.png"]))
    warm.close()
    sampler = RssSampler(pid).start()
    time.sleep(3.0)
    baseline = statistics.median(sampler.between(0.0, time.monotonic()))
    began = time.monotonic()
    errors = burst(url, pictures, per_request)
    ended = time.monotonic()
    time.sleep(SETTLE_S)
    sampler.stop()
    after = sampler.samples[-1][1]
    peak = max(sampler.between(began, time.monotonic()))
    return {"baseline_mb": baseline, "peak_mb": peak, "after_mb": after, "burst_s": ended - began,
            "errors": errors}


def report(result: dict, requests: int, per_request: int, side: int) -> bool:
    """Print the numbers and a PASS/FAIL line per floor; True when both hold and nothing failed."""
    baseline, peak, after = result["baseline_mb"], result["peak_mb"], result["after_mb"]
    peak_ok = peak - baseline <= PEAK_FLOOR_MB
    settled_ok = after <= baseline * (1 + SETTLED_FLOOR)
    print(f"date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}")
    print(f"machine: {platform.platform()}, {platform.machine()}, {os.cpu_count()} cores, "
          f"Python {platform.python_version()}")
    print(f"load: {requests} concurrent requests x {per_request} pictures of {side}x{side} "
          f"({side * side / 1e6:.0f} MP), all answered in {result['burst_s']:.1f} s")
    print(f"baseline RSS:     {baseline:8.0f} MB")
    print(f"peak RSS:         {peak:8.0f} MB  (+{peak - baseline:.0f} MB)")
    print(f"RSS after {SETTLE_S:.0f} s:  {after:8.0f} MB  ({(after / baseline - 1) * 100:+.1f}%)")
    print(f"{'PASS' if peak_ok else 'FAIL'}: peak at most {PEAK_FLOOR_MB:.0f} MB above baseline")
    print(f"{'PASS' if settled_ok else 'FAIL'}: within {SETTLED_FLOOR:.0%} of baseline {SETTLE_S:.0f} s after")
    for error in result["errors"]:
        print(f"FAIL: a request got no reply: {error}")
    return peak_ok and settled_ok and not result["errors"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--pictures", type=int, default=4, help="pictures per request")
    parser.add_argument("--side", type=int, default=6000, help="pictures are side x side pixels")
    parser.add_argument("--tiny-model-dir", default="")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="picture-memory-") as folder:
        pictures = make_pictures(Path(folder), args.requests * args.pictures, args.side)
        with launched_app(args.requests, args.tiny_model_dir) as (url, pid):
            result = measure(url, pid, pictures, args.pictures)
    return 0 if report(result, args.requests, args.pictures, args.side) else 1


if __name__ == "__main__":
    sys.exit(main())
