"""Large page events against memory and the feedback log: what a client that bypasses the page
can make the server keep.

Launches the tiny-model app in its own process and sends `--events` events from as many browser
sessions, `--mb` megabytes each (a forged chat history), taking turns: the two the issue
measured, a rating of an invented reply (the page's like event) and /chat with a long history,
and the page's own send (its `ask` step, which keeps a question until its answer runs). Reports
the server's memory before (after a warm-up of small events), during and after (it must come
back within 200 MB of the start) and the feedback log's size (it must not grow: none of these
replies is the server's).

    python benchmarks/page_events.py [--events 1000] [--mb 36] [--threads 4]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))

import soak  # noqa: E402  (the app in its own process)
from page_event import send_event  # noqa: E402


def send(url: str, config: dict, session: str, **event) -> str:
    """One event; how it ended: "completed", "no completion", or the HTTP status of a refused join."""
    joined, completed = send_event(url, config, session, **event)
    if joined.status_code != 200:
        return f"HTTP {joined.status_code}"
    return "completed" if completed else "no completion"


def run(url: str, pid: int, events: int, megabytes: float, threads: int, feedback_log: Path) -> dict:
    config = httpx.get(f"{url}config", timeout=10).json()
    process = psutil.Process(pid)
    history = [{"role": "user", "content": "An invented question?"},
               {"role": "assistant", "content": "An invented answer. " + "x" * int(megabytes * 2**20)}]
    rating = {"index": 1, "value": [history[1]["content"][:100]], "liked": True}
    for n in range(8):  # warm-up with small events: worker threads, lazy imports, Gradio's caches
        small = [history[0], {"role": "assistant", "content": "A short invented answer."}]
        send(url, config, f"warm{n}", api_name=None, event="like", data=[small], event_data=rating)
        send(url, config, f"warm-chat{n}", api_name="chat", event=None,
             data=[{"text": "hi", "files": []}, small, 4] + [None] * 8, event_data=None)
    time.sleep(5)
    start_mb = process.memory_info().rss / 2**20
    peak_mb, outcomes, lock = start_mb, {}, threading.Lock()
    counter = iter(range(events))

    def sender() -> None:
        nonlocal peak_mb
        for n in counter:
            if n % 3 == 1:
                outcome = send(url, config, f"rater{n}", api_name=None, event="like", data=[history], event_data=rating)
            elif n % 3 == 2:
                outcome = send(url, config, f"sender{n}", api_name=None, event="submit",
                               data=[{"text": "hi", "files": []}, history, f"question{n}"], event_data=None)
            else:
                outcome = send(url, config, f"asker{n}", api_name="chat", event=None,
                               data=[{"text": "hi", "files": []}, history] + [None] * 9, event_data=None)
            with lock:
                outcomes[outcome] = outcomes.get(outcome, 0) + 1
                peak_mb = max(peak_mb, process.memory_info().rss / 2**20)

    workers = [threading.Thread(target=sender) for _ in range(threads)]
    began = time.monotonic()
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    seconds = time.monotonic() - began
    end_mb = process.memory_info().rss / 2**20
    after = {}
    for wait in (10, 20, 30):  # the monitor hands freed malloc pages back every 2 s
        time.sleep(wait - (max(after) if after else 0))
        after[wait] = process.memory_info().rss / 2**20
    settled_mb = after[30]
    return {"events": events, "mb_each": megabytes, "seconds": round(seconds, 1), "outcomes": outcomes,
            "rss_mb": {"start": round(start_mb), "peak": round(peak_mb), "end": round(end_mb),
                       **{f"after_{wait}s": round(mb) for wait, mb in after.items()}},
            "rss_growth_mb": round(settled_mb - start_mb),
            "feedback_log_bytes": feedback_log.stat().st_size if feedback_log.exists() else 0}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=1000)
    parser.add_argument("--mb", type=float, default=36.0, help="size of each event's forged history")
    parser.add_argument("--threads", type=int, default=4)
    parser.add_argument("--tiny-model-dir", default="")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        feedback_log = Path(scratch) / "feedback.jsonl"
        with soak.launched_app(concurrency=8, tiny_model_dir=args.tiny_model_dir,
                               extra_args=("--feedback-log", str(feedback_log))) as (url, pid):
            result = run(url, pid, args.events, args.mb, args.threads, feedback_log)
    print(json.dumps(result, indent=2))
    return 0 if result["rss_growth_mb"] < 200 and result["feedback_log_bytes"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
