"""A short soak: simulated users with valid requests, bad uploads, cancels and abandoned streams.

The full version is `benchmarks/soak.py` (64 users, minutes); this one keeps the suite short. The
app runs in its own process, so its memory and thread counts are the server's alone.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import soak  # noqa: E402


def test_short_soak_loses_nothing_and_leaks_no_threads(tiny_dir, tmp_path):
    """12 users, 6 requests each: every user's mix comes from its own seed, so the same kinds of
    request are sent on any machine, however fast."""
    with soak.launched_app(concurrency=12, tiny_model_dir=tiny_dir) as (url, pid):
        result = soak.run(url, pid, users=12, duration=600, rounds=6, scratch=tmp_path)
    assert result["sent"] == 12 * 6, result
    assert result["lost"] == 0, result["lost_details"]
    assert result["completed"] >= 10 and result["rejected"] >= 1 and result["cancelled"] >= 1, result
    assert result["abandoned"] >= 1, result
    assert result["settled"], f"the engine went idle: no stuck rows, nothing left waiting {result}"
    assert not soak.leaked(result), result
    during = result["rss_mb_during_load"]
    assert max(during) - min(during) < 250, f"memory kept growing under load: {result}"
