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


def test_an_event_carries_at_most_a_message_and_a_chat_within_the_limits(tiny_settings, loaded_tiny):
    """Past them the event is refused before it is read (Gradio keeps an event's body while it
    runs), with a message saying why; /chat with a chat at the limit still gets its answer."""
    import httpx

    app, url = launch_app(replace(tiny_settings, cache_size=0, max_history_chars=100_000,
                                  max_message_chars=10_000), loaded_tiny)
    try:
        history = [{"role": "user", "content": "x" * 2_000_000}]  # over 6 bytes per character allowed
        refused = httpx.post(f"{url}gradio_api/queue/join", json={"data": [{"text": "hi", "files": []}, history],
                                                                  "fn_index": 0, "session_hash": "big"}, timeout=30)
        assert refused.status_code == 413 and "--max-history-chars" in refused.text
        for route in ("run/chat", "call/chat", "api/chat"):  # every route that runs an event
            refused = httpx.post(f"{url}gradio_api/{route}", json={"data": [{"text": "hi", "files": []}, history]},
                                 timeout=30)
            assert refused.status_code == 413, route
        within = [{"role": "user", "content": "y" * 90_000}, {"role": "assistant", "content": "z"}]
        stream = send_event(url, api_name="chat", session="fits", data=[{"text": "hi", "files": []}, within, 4] + [None] * 8)
        assert "process_completed" in stream and '"success":true' in stream.replace(" ", "")
    finally:
        app.close()
