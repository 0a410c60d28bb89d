"""Sending one of the page's events the way a script can, bypassing the page (a forger, a probe)."""

from __future__ import annotations

import httpx


def send_event(url: str, *, data: list, event: str | None = None, api_name: str | None = None,
               event_data: dict | None = None, session: str = "script") -> str:
    """Join the queue with one event (chosen by its trigger `event`, or by `api_name`) and read its
    stream to the end; returns the stream's text (the event's completion is in it)."""
    config = httpx.get(f"{url}config", timeout=10).json()
    dependency = next(d for d in config["dependencies"]
                      if (api_name and d.get("api_name") == api_name) or
                      (event and any(t[1] == event for t in d["targets"])))
    body = {"data": data, "event_data": event_data, "fn_index": dependency["id"], "session_hash": session,
            "trigger_id": dependency["targets"][0][0] if dependency["targets"] else None}
    joined = httpx.post(f"{url}gradio_api/queue/join", json=body, headers={"x-gradio-user": "app"}, timeout=60)
    if joined.status_code != 200:
        return joined.text
    text = ""
    with httpx.stream("GET", f"{url}gradio_api/queue/data", params={"session_hash": session}, timeout=120) as stream:
        for line in stream.iter_lines():
            text += line + "\n"
            if "process_completed" in line:
                break
    return text
