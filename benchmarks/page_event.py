"""One event of the page sent as a script sends it: Gradio's `queue/join`, then the session's
stream until the event completes. What a client that bypasses the page can make the server do
and keep; used by page_events.py (memory under many large events) and hostile.py (its page cases).
"""

from __future__ import annotations

import json

import httpx


def send_event(url: str, config: dict, session: str, *, data: list, api_name: str | None = None,
               event: str | None = None, event_data: dict | None = None,
               headers: dict | None = None) -> tuple[httpx.Response, bool]:
    """Join the event named by `api_name` (or by its trigger, `event`) for `session`: the join's
    response, and whether the event then completed (False where the join was refused)."""
    dependency = next(d for d in config["dependencies"]
                      if (api_name and d.get("api_name") == api_name) or
                      (event and any(t[1] == event for t in d["targets"])))
    body = json.dumps({"data": data, "event_data": event_data, "fn_index": dependency["id"], "session_hash": session,
                       "trigger_id": dependency["targets"][0][0] if dependency["targets"] else None})
    joined = httpx.post(f"{url}gradio_api/queue/join", content=body, timeout=120,
                        headers={"content-type": "application/json", "x-gradio-user": "app", **(headers or {})})
    if joined.status_code != 200:
        return joined, False
    with httpx.stream("GET", f"{url}gradio_api/queue/data", params={"session_hash": session}, timeout=300,
                      headers=headers or {}) as stream:
        for line in stream.iter_lines():
            if "process_completed" in line:
                return joined, True
    return joined, False
