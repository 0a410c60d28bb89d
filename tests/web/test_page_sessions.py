"""What the server keeps for browser sessions is bounded: at most `--page-sessions` of them, and
none keeps the values its events carried (a long chat sent once is not kept for good)."""

from __future__ import annotations

import json
from dataclasses import replace

from conftest import launch_app
from page_http import send_event


def kept_bytes(app) -> int:
    """What Gradio keeps of all sessions' event values, as JSON."""
    sessions = list(app.demo.state_holder.session_data.values())
    return len(json.dumps([s.config_values for s in sessions], default=str))


def test_sessions_are_bounded_and_keep_no_event_values(tiny_settings, loaded_tiny):
    app, url = launch_app(replace(tiny_settings, page_sessions=5, cache_size=0), loaded_tiny)
    try:
        history = [{"role": "user", "content": "x" * 2_000_000}]  # refused (too long), once kept for good
        for n in range(12):
            stream = send_event(url, api_name="chat", session=f"visitor{n}",
                                data=[{"text": "hi", "files": []}, history] + [None] * 9)
            assert "chat is too long" in stream
        assert len(app.demo.state_holder.session_data) <= 5, "at most --page-sessions sessions"
        assert kept_bytes(app) < 1_000_000, f"{kept_bytes(app):,} bytes of event values kept"
    finally:
        app.close()
