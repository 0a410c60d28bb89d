"""Memory a stranger cannot make the server spend (issue 23): index-bomb videos and a backend's odd
answers, measured on the app in its own process (loopback only).

- bombs: 8 MP4s of 6.6 KB whose headers claim 85 million frames each (FFmpeg's index for one took
  3 GB), sent at once through the OpenAI route and then through the page's /chat: every one
  refused with a message, the server's RSS at most 300 MB above its baseline at any moment;
- backend: the app in front of a backend (odd_backend.py) that answers /v1/models with broken
  lists, deep JSON, 8 MB bodies and a 500, and chats with streams without end, keep-alives only,
  256 MB error bodies and endless lines: the status checker keeps up (/health says 503 with the
  reason while the list is bad, 200 again after), every chat ends, and RSS grows under 50 MB.

    python benchmarks/edge_memory.py                  # both
    python benchmarks/edge_memory.py --only bombs     # or backend

Exits non-zero when a floor does not hold.
"""

from __future__ import annotations

import argparse
import base64
import datetime
import json
import os
import platform
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx
from gradio_client import Client, handle_file

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "tests" / "remote"))
from clips import make_clip, make_index_bomb  # noqa: E402 - the tests' clip builders
from odd_backend import GOOD_MODELS, OddBackend  # noqa: E402 - the tests' hostile backend
from picture_memory import RssSampler  # noqa: E402
from soak import launched_app  # noqa: E402

BOMB_FLOOR_MB = 300.0
BACKEND_FLOOR_MB = 50.0
ODD_LISTS = [(200, '{"data": ["g"]}'), (200, "[" * 30_000 + "]" * 30_000), (200, '{"data": {"id": 1}}'),
             (200, b"[" + b" " * (8 * 2**20) + b"]"), (500, b"x" * (8 * 2**20)), (200, "<html>"), (200, '{"data": []}')]
ODD_CHATS = ["endless", "keepalive", "huge error", "long line"]
INDEX_REFUSAL = "index claims more frames and samples than a video within this demo's limits"


def all_at_once(count: int, send: Callable[[int], str]) -> list[str]:
    """`send(i)` for each i on its own thread, released together; returns their outcomes."""
    start = threading.Barrier(count)
    outcomes = [""] * count

    def one(index: int) -> None:
        start.wait()
        try:
            outcomes[index] = send(index)
        except Exception as exc:  # noqa: BLE001 - every outcome is reported
            outcomes[index] = f"{type(exc).__name__}: {str(exc)[:120]}"

    threads = [threading.Thread(target=one, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(300)
    return outcomes


def bombs(count: int = 8) -> dict:
    folder = Path(tempfile.mkdtemp(prefix="bombs-"))
    files = [make_index_bomb(folder / f"bomb-{i}.mp4", 85_000_000) for i in range(count)]
    warm = make_clip(folder / "warm.mp4", seconds=2)
    with launched_app(concurrency=16, extra_args=("--cache-size", "0")) as (url, pid):
        client = Client(url, verbose=False, ssl_verify=False)
        client.predict(message={"text": "What happens?", "files": [handle_file(str(warm))]}, history=[],
                       max_new_tokens=4, temperature=0.0, top_p=1.0, api_name="/chat")  # the video path, warm
        sampler = RssSampler(pid, every=0.02).start()
        time.sleep(0.5)
        baseline = max(sampler.between(0, time.monotonic()))

        def api(index: int) -> str:
            video = "data:video/mp4;base64," + base64.b64encode(files[index].read_bytes()).decode()
            answer = httpx.post(f"{url}v1/chat/completions", timeout=120, json={"max_tokens": 4, "messages": [
                {"role": "user", "content": [{"type": "video_url", "video_url": {"url": video}},
                                             {"type": "text", "text": "What happens?"}]}]})
            return f"{answer.status_code}: {answer.json()['error']['message']}" if answer.status_code != 200 \
                else "answered"

        def page(index: int) -> str:
            visitor = Client(url, verbose=False, ssl_verify=False)
            try:
                visitor.predict(message={"text": "What happens?", "files": [handle_file(str(files[index]))]},
                                history=[], max_new_tokens=4, temperature=0.0, top_p=1.0, api_name="/chat")
                return "answered"
            except Exception as exc:  # noqa: BLE001 - the refusal is the expected outcome
                return f"refused: {exc}"
            finally:
                visitor.close()

        api_outcomes, page_outcomes = all_at_once(count, api), all_at_once(count, page)
        time.sleep(0.5)
        sampler.stop()
        client.close()
    peak = max(mb for _, mb in sampler.samples)
    refused = all(INDEX_REFUSAL in outcome for outcome in api_outcomes + page_outcomes)
    return {"bombs at once": count, "claimed frames each": 85_000_000, "file bytes": files[0].stat().st_size,
            "api outcomes": _counted(api_outcomes), "page outcomes": _counted(page_outcomes),
            "baseline_mb": round(baseline), "peak_growth_mb": round(peak - baseline, 1),
            "pass": refused and peak - baseline < BOMB_FLOOR_MB}


def backend() -> dict:
    odd = OddBackend()
    try:
        extra = ("--backend", odd.url, "--panel-interval", "0.2", "--backend-timeout", "10",
                 "--backend-reply-seconds", "5")
        with launched_app(concurrency=16, extra_args=extra) as (url, pid):
            return _against(odd, url, pid)
    finally:
        odd.close()


def _against(odd: OddBackend, url: str, pid: int) -> dict:
    def health() -> httpx.Response:
        return httpx.get(f"{url}health", timeout=10)

    def chat(_index: int) -> str:
        answer = httpx.post(f"{url}v1/chat/completions", timeout=120, json={
            "max_tokens": 16, "messages": [{"role": "user", "content": "Hello?"}]})
        body = answer.json()
        return f"{answer.status_code} " + (body["choices"][0]["finish_reason"] if answer.status_code == 200
                                           else body["error"]["message"][:70])

    sampler = RssSampler(pid, every=0.05).start()
    all_at_once(4, chat)  # warm: the client's connections and the route
    time.sleep(1.0)
    baseline = max(sampler.between(0, time.monotonic()))
    lists = []
    for answer in ODD_LISTS:
        odd.models = answer
        said = _until(lambda: health().status_code == 503, 30)
        lists.append({"answer": f"{answer[0]} {str(answer[1][:24])}…", "health 503": said,
                      "reason": health().json()["backend"]["error"]})
        odd.models = (200, GOOD_MODELS)
        lists[-1]["back to 200"] = _until(lambda: health().status_code == 200, 30)
    chats = {}
    for behaviour in ODD_CHATS:
        odd.chat = behaviour
        chats[behaviour] = sorted(set(all_at_once(4, chat)))
    time.sleep(1.0)
    sampler.stop()
    peak = max(mb for _, mb in sampler.samples)
    honest = all(entry["health 503"] and entry["back to 200"] for entry in lists)
    ended = all(outcome[0].isdigit() for outcomes in chats.values() for outcome in outcomes)
    return {"model lists": lists, "chats": chats, "baseline_mb": round(baseline),
            "peak_growth_mb": round(peak - baseline, 1), "checker alive": health().status_code == 200,
            "pass": honest and ended and peak - baseline < BACKEND_FLOOR_MB}


def _counted(outcomes: list[str]) -> dict[str, int]:
    """Outcomes by kind: the index refusal (whatever the file's name), or the outcome itself."""
    kinds = [f"refused: ...{INDEX_REFUSAL}..." if INDEX_REFUSAL in outcome else outcome for outcome in outcomes]
    return {kind: kinds.count(kind) for kind in sorted(set(kinds))}


def _until(condition: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.1)
    return False


CHECKS = {"bombs": bombs, "backend": backend}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=sorted(CHECKS), action="append")
    args = parser.parse_args()
    print(f"# {datetime.date.today()} · {platform.platform()} · {os.cpu_count()} cores · tiny model, CPU", flush=True)
    failed = []
    for name in args.only or list(CHECKS):
        result = CHECKS[name]()
        print(f"{name}: {json.dumps(result)}", flush=True)
        if not result["pass"]:
            failed.append(name)
    print("FAILED: " + ", ".join(failed) if failed else "all floors hold")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
