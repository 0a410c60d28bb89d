"""A short soak: simulated users with valid requests, bad uploads, cancels and abandoned streams.

The full version is `benchmarks/soak.py` (64 users, minutes); this one keeps the suite short.
"""

from __future__ import annotations

import os
import sys
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import soak  # noqa: E402

from minicpmv_demo.server import build_app  # noqa: E402


def test_short_soak_loses_nothing_and_leaks_no_threads(tiny_settings, loaded_tiny, tmp_path):
    app = build_app(replace(tiny_settings, max_new_tokens=96, cache_size=16), loaded_tiny)
    _, url, _ = app.launch(server_port=None, quiet=True)
    try:
        result = soak.run(url, os.getpid(), users=12, duration=15, scratch=tmp_path)
    finally:
        app.close()
    assert result["lost"] == 0, result
    assert result["completed"] >= 10 and result["rejected"] >= 1 and result["cancelled"] >= 1, result
    assert result["abandoned"] >= 1, result
    assert result["settled"], f"the engine went idle: no stuck rows, nothing left waiting {result}"
    assert not soak.leaked(result), result
    during = result["rss_mb_during_load"]
    assert max(during) - min(during) < 250, f"memory kept growing under load: {result}"
