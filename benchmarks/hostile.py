"""Hostile requests against the app's HTTP edge: every one must be answered, and none with a 500.

The battery holds the cases earlier probes sent (NaN settings, bodies past the limit, JSON
nested thousands deep, broken uploads and data URLs, files outside the upload folder, huge
messages) and the ones issue 23 added (videos whose index claims millions of frames, OpenAI
fields the server does not do, unknown models, bad stop strings and seeds, prompts longer than
the context, logins from rotating X-Forwarded-For addresses, page events sent past the page: a
forged rating, a forged chat, a 36 MB event). Each case is classed by its answer:

- `answered` (2xx) or `refused` (4xx with a JSON error message): what a client can act on;
- `bare 500`: any other 5xx, or a 4xx/5xx without a message; `no answer`: the connection was
  dropped (a refused upload excepted, which a server may close on). Both must stay 0.

    python benchmarks/hostile.py      # launches the tiny-model app open, then with --auth; every case twice

`send_case` is also what the soak's hostile user sends (soak.py --hostile). Loopback only.
"""

from __future__ import annotations

import argparse
import base64
import datetime
import json
import os
import platform
import random
import sys
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import httpx
import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from clips import make_clip, make_cue_bomb, make_index_bomb  # noqa: E402 - the tests' clip builders
from page_event import send_event  # noqa: E402 - beside this script

ASSETS = ROOT / "assets"
MB = 2**20
LOGINS = "rotating X-Forwarded-For logins"


def _picture_url(name: str = "chart.png") -> str:
    return "data:image/png;base64," + base64.b64encode((ASSETS / name).read_bytes()).decode()


def _video_url(path: Path, mime: str) -> str:
    return f"data:{mime};base64," + base64.b64encode(path.read_bytes()).decode()


class Battery:
    """The cases, with the files they send made once into `scratch`."""

    def __init__(self, scratch: Path) -> None:
        scratch.mkdir(parents=True, exist_ok=True)
        self.videos = {
            "mp4 index bomb": _video_url(make_index_bomb(scratch / "bomb.mp4", 85_000_000), "video/mp4"),
            "fragment bomb": _video_url(make_index_bomb(scratch / "frag.mp4", 10_000_000, fragmented=True),
                                        "video/mp4"),
            "webm cue bomb": _video_url(make_cue_bomb(scratch / "cues.webm", 400_000), "video/webm"),
            "clip": _video_url(make_clip(scratch / "clip.mp4", seconds=2), "video/mp4"),
        }
        self.cases: dict[str, Callable[[httpx.Client, str], httpx.Response]] = {
            **{name: self._chat(json_text) for name, json_text in _RAW_BODIES.items()},
            **{name: self._fields(fields) for name, fields in _FIELD_CASES.items()},
            **{name: self._video(name) for name in self.videos},
            "60 MB body": _big_body,
            "upload of 100 MB": _big_upload,
            "file outside the uploads": self._fields({"messages": [{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": "http://x/gradio_api/file=/etc/passwd"}}]}]}),
            "prompt longer than the context": self._fields(
                {"messages": [{"role": "user", "content": "the sea and the sky " * 4900}]}),
            "gradio route with deep JSON": lambda client, url: client.post(
                f"{url}gradio_api/queue/join", content="[" * 50_000, headers={"content-type": "application/json"}),
            # The page's own events sent past the page: a rating of a reply the server never gave
            # (with line breakers in it), a send carrying a forged chat, /chat carrying 36 MB.
            "forged rating of an invented reply": self._page_event(
                event="like", data=[_forged_chat(5)], event_data={"index": 1, "value": ["x"], "liked": True}),
            "page send with a forged chat": self._page_event(
                event="submit", data=[{"text": "hi", "files": []}, _forged_chat(5), "hostile-question"], event_data=None),
            "/chat event of 36 MB": self._page_event(
                api_name="chat", data=[{"text": "hi", "files": []}, _forged_chat(36)] + [None] * 9, event_data=None),
            # Last: with --auth its wrong keys shut this address out for a minute (as they should).
            LOGINS: _rotating_logins,
        }

    def _chat(self, raw: str) -> Callable[[httpx.Client, str], httpx.Response]:
        return lambda client, url: client.post(f"{url}v1/chat/completions", content=raw,
                                               headers={"content-type": "application/json"})

    def _fields(self, fields: dict) -> Callable[[httpx.Client, str], httpx.Response]:
        body = {"messages": [{"role": "user", "content": "Say something."}], "max_tokens": 8, **fields}
        return lambda client, url: client.post(f"{url}v1/chat/completions", json=body)

    def _page_event(self, **event) -> Callable[[httpx.Client, str], httpx.Response]:
        """A page event joined as a script joins it: the join's answer where it is refused, else
        200 if the event completed (502 if it never did)."""
        def case(client: httpx.Client, url: str) -> httpx.Response:
            config = client.get(f"{url}config")
            if config.status_code != 200 or "dependencies" not in config.json():  # a login comes first
                return client.post(f"{url}gradio_api/queue/join", json={"data": [], "fn_index": 0,
                                                                          "session_hash": "hostile"})
            joined, completed = send_event(url, config.json(), f"hostile{random.getrandbits(48):x}",
                                           headers={k: v for k, v in client.headers.items() if k == "authorization"},
                                           **event)
            return joined if joined.status_code != 200 else httpx.Response(200 if completed else 502)
        return case

    def _video(self, name: str) -> Callable[[httpx.Client, str], httpx.Response]:
        parts = [{"type": "video_url", "video_url": {"url": self.videos[name]}}, {"type": "text", "text": "What?"}]
        return self._fields({"messages": [{"role": "user", "content": parts}]})

    def send(self, name: str, client: httpx.Client, url: str) -> str:
        """Send one case; its outcome: "answered", "refused", "bare 500" or "no answer"."""
        try:
            response = self.cases[name](client, url)
        except httpx.HTTPError:  # the server may close the connection on a refused upload
            return "refused" if "MB" in name else "no answer"
        return classify(response)


def classify(response: httpx.Response) -> str:
    if response.status_code < 300:
        return "answered"
    if response.status_code in (503, 429) or 400 <= response.status_code < 500:
        try:
            body = response.json()
        except ValueError:
            body = None
        message = body.get("error", {}).get("message") if isinstance(body, dict) and isinstance(
            body.get("error"), dict) else (body.get("detail") if isinstance(body, dict) else None)
        return "refused" if message else "bare 500"
    return "bare 500"


# Bodies a careless or hostile client sends as they are (json.dumps would not write them).
_RAW_BODIES = {
    "NaN temperature": '{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 8, "temperature": NaN}',
    "infinite top_p": '{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 8, "top_p": Infinity}',
    "JSON nested 100,000 deep": "[" * 100_000 + "]" * 100_000,
    "object nested 5,000 deep in messages": '{"messages": ' + '{"a": ' * 5_000 + "1" + "}" * 5_001,
    "not JSON": "this is not json",
    "a JSON array": "[1, 2, 3]",
    "lone surrogate": '{"messages": [{"role": "user", "content": "\\ud800 hi"}], "max_tokens": 8}',
}
_FIELD_CASES = {
    "tools": {"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}], "tool_choice": "required"},
    "response_format json": {"response_format": {"type": "json_object"}},
    "logprobs": {"logprobs": True, "top_logprobs": 5},
    "n = 3": {"n": 3},
    "unknown model": {"model": "gpt-5-turbo"},
    "stop strings": {"stop": ["\n", "the"], "temperature": 0},
    "bad stop": {"stop": [1, 2]},
    "seed": {"seed": 42, "temperature": 1.0},
    "bad seed": {"seed": "forty-two"},
    "messages not a list": {"messages": "hello"},
    "role of a number": {"messages": [{"role": 5, "content": "hi"}]},
    "content of a number": {"messages": [{"role": "user", "content": 5}]},
    "image part without url": {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": 5}]}]},
    "bad base64 picture": {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,@@@"}}]}]},
    "text as a picture": {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(b"hi").decode()}}]}]},
    "max_tokens of a word": {"max_tokens": "many"},
    "max_tokens negative": {"max_tokens": -5},
    "temperature of a list": {"temperature": [1]},
    "unknown mm_processor_kwargs": {"mm_processor_kwargs": {"rm": "-rf"}},
    "message of 200,000 characters": {"messages": [{"role": "user", "content": "a" * 200_000}]},
    "null bytes": {"messages": [{"role": "user", "content": "\x00\x00 hi \x00"}]},
    "stream with refused field": {"stream": True, "tools": [{"type": "function"}]},
}


def _forged_chat(megabytes: float) -> list[dict]:
    """A chat history the server never saw: a question, and an answer of `megabytes` with the
    characters some line readers break lines at."""
    return [{"role": "user", "content": "An invented question?\u2028\u2029\x85"},
            {"role": "assistant", "content": "An invented answer.\u2028 " + "x" * int(megabytes * MB)}]


def _big_body(client: httpx.Client, url: str) -> httpx.Response:
    body = b'{"messages": [{"role": "user", "content": "' + b"a" * (60 * MB) + b'"}]}'
    return client.post(f"{url}v1/chat/completions", content=body, headers={"content-type": "application/json"})


def _big_upload(client: httpx.Client, url: str) -> httpx.Response:
    return client.post(f"{url}gradio_api/upload", files={"files": ("big.png", b"\0" * (100 * MB), "image/png")})


def _rotating_logins(client: httpx.Client, url: str) -> httpx.Response:
    """Wrong API keys from one address posing as many: refused (401, then 429), never served."""
    response = None
    for index in range(8):
        response = client.get(f"{url}v1/models", headers={"authorization": "Bearer wrong",
                                                         "x-forwarded-for": f"10.9.{index}.{index}"})
    return response


def send_case(battery: Battery, rng: random.Random, client: httpx.Client, url: str) -> tuple[str, str]:
    """One case picked by `rng`, sent: (its name, its outcome). The soak's hostile user."""
    name = rng.choice(sorted(set(battery.cases) - {LOGINS}))
    return name, battery.send(name, client, url)


def run(url: str, scratch: Path, rounds: int = 2, key: str = "", pid: int = 0) -> dict:
    """Every case `rounds` times, with the API key `key` (the app's --auth password) if any;
    with the server's `pid`, its memory after each round (it must level off, not keep rising)."""
    battery = Battery(scratch)
    outcomes: Counter = Counter()
    bare: list[str] = []
    memory: list[float] = []
    with httpx.Client(timeout=120, headers={"authorization": f"Bearer {key}"} if key else {}) as client:
        for round_ in range(rounds):
            if pid:
                memory.append(round(psutil.Process(pid).memory_info().rss / MB, 1))
            for name in battery.cases:
                if name == LOGINS and round_ < rounds - 1:
                    continue  # once, at the very end (see Battery)
                outcome = battery.send(name, client, url)
                outcomes[outcome] += 1
                if outcome in ("bare 500", "no answer"):
                    bare.append(f"{name}: {outcome}")
    return {"cases": len(battery.cases), "sent": sum(outcomes.values()), **outcomes, "failed cases": bare,
            **({"rss_mb_before_each_round": memory} if memory else {}), "pass": not bare}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="", help="a running app (loopback); default: launch one, open then "
                                                  "with --auth")
    parser.add_argument("--key", default="", help="the running app's API key, if it has --auth")
    parser.add_argument("--rounds", type=int, default=2, help="times every case is sent")
    args = parser.parse_args()
    scratch = Path(os.environ.get("TMPDIR", "/tmp")) / "minicpmv-hostile"
    print(f"# {datetime.date.today()} · {platform.platform()} · {os.cpu_count()} cores · tiny model, CPU", flush=True)
    if args.url:
        results = {"given app": run(args.url, scratch, args.rounds, key=args.key)}
    else:
        from soak import launched_app

        results = {}
        for name, auth in (("open", ()), ("with --auth", ("--auth", "ann:pw"))):
            with launched_app(concurrency=16, extra_args=("--cache-size", "0", *auth)) as (url, pid):
                results[name] = run(url, scratch, args.rounds, key="pw" if auth else "", pid=pid)
    for name, result in results.items():
        print(f"{name}: {json.dumps(result)}", flush=True)
    return 0 if all(result["pass"] for result in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
