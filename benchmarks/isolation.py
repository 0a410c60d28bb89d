"""One user must never break another: the reliability floors, measured against the tiny-model app.

Each check launches the app in its own process on loopback (so its memory, threads and interpreter
are its own) and prints what it measured beside its floor:

- bad settings: a NaN, inf or -1 temperature or top_p among 8 concurrent API requests; the 7
  others answer exactly what they answer alone, the bad one is refused (or clamped, for a finite
  -1), and the engine never restarts;
- health under load: 250 concurrent non-streaming requests, `/health` probed every 20 ms: at
  most 200 ms each;
- big body: a 300 MB body, without and with credentials: refused before the server grows 50 MB;
- long history: a 160-turn chat (4 KB a turn) through `/chat`, answered or refused within 2 s,
  while 4 other users' short requests keep their p95 latency within 20%.

    python benchmarks/isolation.py                   # every check
    python benchmarks/isolation.py --only health     # one of: settings, health, body, history

Exits non-zero when a floor does not hold. Loopback only; every loop is bounded in count and time.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import multiprocessing
import os
import platform
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import psutil
from gradio_client import Client

sys.path.insert(0, str(Path(__file__).resolve().parent))
from soak import launched_app  # noqa: E402 - the benchmarks' shared launcher

MB = 2**20


def completion(url: str, body: dict | str, timeout: float = 120, **headers: str) -> httpx.Response:
    raw = body if isinstance(body, str) else json.dumps(body)
    return httpx.post(f"{url}v1/chat/completions", content=raw, timeout=timeout,
                      headers={"content-type": "application/json", **headers})


def reply_text(response: httpx.Response) -> str | None:
    return response.json()["choices"][0]["message"]["content"] if response.status_code == 200 else None


def percentile(values: list[float], pct: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(pct / 100 * (len(ordered) - 1))))]


# -- bad settings ---------------------------------------------------------------------------------
BAD_VALUES = [("temperature", "NaN"), ("temperature", "Infinity"), ("temperature", "-1"),
              ("top_p", "NaN"), ("top_p", "Infinity"), ("top_p", "-1")]


def bad_settings(url: str) -> dict:
    prompts = [f"Tell me about picture number {i}." for i in range(7)]

    def body(prompt: str, temperature: str = "0", top_p: str = "1") -> str:
        """Raw JSON: NaN and Infinity are what a careless client sends, and json.dumps will not."""
        return ('{"messages": [{"role": "user", "content": %s}], "max_tokens": 24, "temperature": %s, "top_p": %s}'
                % (json.dumps(prompt), temperature, top_p))

    alone = [reply_text(completion(url, body(p))) for p in prompts]
    restarts = httpx.get(f"{url}health", timeout=10).json()["engine_restarts"]
    rounds = []
    for name, value in BAD_VALUES:
        bad_body = body("a bad one", **{name: value})
        results: list[httpx.Response | None] = [None] * 8

        def send(i: int) -> None:
            results[i] = completion(url, bad_body if i == 7 else body(prompts[i]))

        threads = [threading.Thread(target=send, args=(i,)) for i in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
        bad = results[7]
        rounds.append({"value": f"{name}={value}", "others_as_alone": [reply_text(r) for r in results[:7]] == alone,
                       "bad_status": bad.status_code,
                       "bad_message": bad.json().get("error", {}).get("message", "answered (clamped)")})
    restarts_after = httpx.get(f"{url}health", timeout=10).json()["engine_restarts"]
    ok = (all(r["others_as_alone"] for r in rounds) and restarts_after == restarts
          and all(r["bad_status"] == 400 for r in rounds if r["value"].split("=")[1] != "-1")
          and all(r["bad_status"] == 200 for r in rounds if r["value"].split("=")[1] == "-1"))
    return {"rounds": rounds, "engine_restarts": restarts_after - restarts, "pass": ok}


# -- /health while many requests wait ----------------------------------------------------------------
def probe_health(url: str, stop, delays) -> None:
    """GET /health every 20 ms until `stop` is set; runs in a process of its own, so the load's
    client does not slow the probe down and make the server look slower than it is."""
    with httpx.Client(timeout=10) as client:
        while not stop.is_set():
            started = time.perf_counter()
            client.get(f"{url}health")
            delays.append(time.perf_counter() - started)
            stop.wait(0.02)


def health_under_load(url: str, requests: int = 250, max_tokens: int = 32) -> dict:
    manager = multiprocessing.Manager()
    stop, delays = manager.Event(), manager.list()

    async def load() -> list[int]:
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
        async with httpx.AsyncClient(timeout=600, limits=limits) as client:
            body = {"messages": [{"role": "user", "content": "Describe a long day."}], "max_tokens": max_tokens,
                    "temperature": 0}
            responses = await asyncio.gather(*(client.post(f"{url}v1/chat/completions", json=body)
                                               for _ in range(requests)))
            return [r.status_code for r in responses]

    prober = multiprocessing.Process(target=probe_health, args=(url, stop, delays))
    prober.start()
    time.sleep(1.0)  # the probe's own start-up is not the server's latency
    started = time.perf_counter()
    codes = asyncio.run(load())
    seconds = time.perf_counter() - started
    stop.set()
    prober.join()
    delays = list(delays)
    return {"requests": requests, "answered": codes.count(200), "busy": codes.count(503),
            "other": len(codes) - codes.count(200) - codes.count(503), "seconds": round(seconds, 1),
            "health_probes": len(delays), "health_max_ms": round(1000 * max(delays), 1),
            "health_p99_ms": round(1000 * percentile(delays, 99), 1),
            "pass": max(delays) <= 0.2 and codes.count(200) + codes.count(503) == requests}


# -- a 300 MB body -------------------------------------------------------------------------------------
def big_body(url: str, pid: int, credentials: str | None, size: int = 300 * MB) -> dict:
    """Stream `size` bytes of JSON-looking text (the client never holds them), with a Content-Length
    header and then chunked without one; the server's RSS is sampled all along."""
    server = psutil.Process(pid)
    baseline = server.memory_info().rss
    peak = baseline
    headers = {"content-type": "application/json"}
    if credentials:
        headers["authorization"] = f"Bearer {credentials}"

    head, tail = b'{"messages": [{"role": "user", "content": "', b'"}]}'

    def chunks() -> Iterator[bytes]:
        nonlocal peak
        yield head
        block = b"a" * MB
        for _ in range(size // MB):
            peak = max(peak, server.memory_info().rss)
            yield block
        yield tail

    outcomes = []
    for with_length in (True, False):
        length = len(head) + size // MB * MB + len(tail)
        sent_headers = {**headers, **({"content-length": str(length)} if with_length else {})}
        try:
            response = httpx.post(f"{url}v1/chat/completions", content=chunks(), headers=sent_headers, timeout=120)
            outcomes.append(response.status_code)
        except httpx.HTTPError as exc:  # the server may close the connection on the refusal
            outcomes.append(type(exc).__name__)
        peak = max(peak, server.memory_info().rss)
    growth = (peak - baseline) / MB
    return {"credentials": bool(credentials), "outcomes (with length, chunked)": outcomes,
            "rss_growth_mb": round(growth, 1), "pass": growth < 50 and 200 not in outcomes}


# -- a long history beside other users ------------------------------------------------------------------
def long_history(url: str, others: int = 4, seconds: float = 30.0, turns: int = 160, turn_chars: int = 4000,
                 every: float = 10.0) -> dict:
    """A 160-turn chat every `every` seconds, each with a new last question (the app runs without
    its reply cache here, so each one is trimmed, encoded and prefilled for real), beside `others`
    users asking short questions back to back."""
    def other_users(deadline: float, latencies: list[float]) -> None:
        def one(index: int) -> None:
            with httpx.Client(timeout=60) as client:
                while time.monotonic() < deadline:
                    body = {"messages": [{"role": "user", "content": f"Short question {index}?"}],
                            "max_tokens": 16, "temperature": 0}
                    started = time.perf_counter()
                    client.post(f"{url}v1/chat/completions", json=body).raise_for_status()
                    latencies.append(time.perf_counter() - started)

        threads = [threading.Thread(target=one, args=(i,)) for i in range(others)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()

    filler = ("the picture shows a house by the sea " * (turn_chars // 37 + 1))[:turn_chars]
    history = [{"role": "user" if i % 2 == 0 else "assistant", "content": f"{i}: {filler}"} for i in range(turns)]
    alone: list[float] = []
    other_users(time.monotonic() + seconds, alone)
    beside: list[float] = []
    heavy: list[float] = []
    outcomes: list[str] = []
    deadline = time.monotonic() + seconds
    crowd = threading.Thread(target=other_users, args=(deadline, beside))
    crowd.start()
    client = Client(url, verbose=False, ssl_verify=False)
    try:
        while time.monotonic() < deadline:
            started = time.perf_counter()
            try:
                client.predict(message={"text": f"And now, number {len(heavy)}?", "files": []}, history=history,
                               max_new_tokens=16,
                               temperature=0, top_p=1, api_name="/chat")
                outcomes.append("answered")
            except Exception as exc:  # noqa: BLE001 - a refusal with a message counts as handled
                outcomes.append(f"refused: {str(exc)[:80]}")
            heavy.append(time.perf_counter() - started)
            time.sleep(max(0.0, every - heavy[-1]))
    finally:
        client.close()
    crowd.join()
    ratio = percentile(beside, 95) / percentile(alone, 95)
    return {"history": f"{turns} turns x {turn_chars} chars", "long_requests": len(heavy),
            "long_median_s": round(percentile(heavy, 50), 2), "long_max_s": round(max(heavy), 2), "long_outcomes": sorted(set(outcomes)),
            "others_p95_alone_ms": round(1000 * percentile(alone, 95), 1),
            "others_p95_beside_ms": round(1000 * percentile(beside, 95), 1),
            "long_all_s": [round(h, 2) for h in heavy], "others_p95_ratio": round(ratio, 2), "pass": max(heavy) <= 2.0 and ratio <= 1.2}


CHECKS: dict[str, Callable[[str, int], dict]] = {
    "settings": lambda url, pid: bad_settings(url),
    "health": lambda url, pid: health_under_load(url),
    "body": lambda url, pid: big_body(url, pid, None),
    "history": lambda url, pid: long_history(url),
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=sorted(CHECKS), action="append", help="run only these checks")
    args = parser.parse_args()
    print(f"# {datetime.date.today()} · {platform.platform()} · {os.cpu_count()} cores · tiny model, CPU", flush=True)
    failed = []
    for name in args.only or list(CHECKS):
        # No reply cache: a repeated request must cost what a new one costs.
        with launched_app(concurrency=64, extra_args=("--cache-size", "0")) as (url, pid):
            result = CHECKS[name](url, pid)
        print(f"{name}: {json.dumps(result)}", flush=True)
        if not result["pass"]:
            failed.append(name)
        if name == "body":  # the same with a login: credentials must not open the door to big bodies
            with launched_app(concurrency=64, extra_args=("--auth", "ann:pw")) as (url, pid):
                result = big_body(url, pid, "pw")
            print(f"body with credentials: {json.dumps(result)}", flush=True)
            if not result["pass"]:
                failed.append("body with credentials")
    print("FAILED: " + ", ".join(failed) if failed else "all floors hold")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
