"""GPU memory in the app: the per-reply line, the live panel and /gpu_memory, with a fake nvidia-smi."""

from __future__ import annotations

import os
import stat
from dataclasses import replace
from pathlib import Path

import pytest
from gradio_client import Client, handle_file

from minicpmv_demo.web.chat_view import stats_foot
from minicpmv_demo.web.server import build_app
from minicpmv_demo.web.server_panel import panel_html

ASSETS = Path(__file__).resolve().parents[2] / "assets"
FAKE_GPUS = ("0, GPU-aaaa, 37, 23028, 10240, 12788, 550.54, NVIDIA A10G, 1324, Disabled, Enabled, 61\\n"
             "1, GPU-bbbb, 5, 16384, 1024, 15360, 550.54, Tesla T4, 1325, Disabled, Enabled, 40\\n")


@pytest.fixture(params=["two-gpus", "no-gpu"])
def served(request, tmp_path, tiny_settings, loaded_tiny, monkeypatch):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    if request.param == "two-gpus":
        script = bin_dir / "nvidia-smi"
        script.write_text(f"#!/bin/sh\nprintf '{FAKE_GPUS}'\n")
        script.chmod(script.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}/usr/bin{os.pathsep}/bin")
    app = build_app(replace(tiny_settings, panel_interval=0.2), loaded_tiny)
    _, url, _ = app.launch(server_port=None, quiet=True)
    client = Client(url, verbose=False)
    yield request.param, app, client
    client.close()
    app.close()


def test_reply_line_panel_and_endpoint_show_the_gpus(served):
    kind, app, client = served
    assert client.predict({"text": "What is it?", "files": [handle_file(str(ASSETS / "chart.png"))]},
                          api_name="/chat"), "a reply through the API"
    # The line under a reply on the page: what the page's handler draws when a reply ends.
    stream, _ = app.service.submit({"text": "What is it?", "files": []}, [], app.service.params(12, 0))
    stream.result(timeout=60)
    line = stats_foot(app.service.stats_line(stream.stats), stream.stats, "0123456789abcdef")
    assert line["metadata"], "the line under a reply is display only: never sent back to the model"
    title = line["content"]
    assert "batch 1" in title and "tok/s" in title
    snapshot = client.predict(api_name="/gpu_memory")
    assert snapshot["engine"]["queue_depth"] == 0 and snapshot["engine"]["alive"] is True
    assert snapshot["process"]["rss_mb"] > 0
    html = panel_html(app.monitor.gpu, app.engine, 0)  # what the panel's timer renders
    if kind == "two-gpus":
        assert "NVIDIA A10G 10,240 / 23,028 MB · Tesla T4 1,024 / 16,384 MB" in title
        assert [g["name"] for g in snapshot["gpus"]] == ["NVIDIA A10G", "Tesla T4"]
        assert snapshot["gpus"][0]["memory_used_mb"] == 10240 and snapshot["gpus"][1]["temperature_c"] == 40
        assert "10,240 / 23,028 MB" in html and "37% busy" in html and "61 °C" in html
    else:
        assert "No GPU: running on CPU" in title
        assert snapshot["gpus"] == [] and snapshot["error"] is None
        assert "No GPU: running on CPU" in html
    assert "engine running" in html
    assert len(app.monitor.samples) >= 1
