"""The live side panel beside the chat and the plots of the Server tab: what the server is doing.

Both are read on a timer outside the queue, so they must stay cheap: the GPU reading is cached
by `GpuMemory`, the engine's state is a snapshot, the plots are the monitor's last samples.
"""

from __future__ import annotations

import html
import math

import pandas as pd

from ..engine.contract import ServingEngine
from ..system.gpu import GpuMemory, process_rss_mb
from ..system.monitor import ServerMonitor


def panel_html(gpu: GpuMemory, engine: ServingEngine, waiting: int) -> str:
    """One bar per GPU, then the engine's state; `waiting`: questions waiting for the model,
    wherever they wait (see `WaitingLine.count`)."""
    reading = gpu.read()
    parts = ["<div class='server-panel'><b>Server</b>"]
    for g in reading.gpus:
        share = 100 * g.memory_used_mb / g.memory_total_mb if g.memory_total_mb else 0
        busy = f" · {g.utilization_pct:.0f}% busy" if math.isfinite(g.utilization_pct) else ""
        temperature = f" · {g.temperature_c:.0f} °C" if g.temperature_c is not None else ""
        parts.append(
            f"<div>GPU {g.index}: {html.escape(g.name)}</div>"
            f"<div class='memory-bar'><div style='width:{share:.0f}%'></div></div>"
            f"<div>{g.memory_used_mb:,.0f} / {g.memory_total_mb:,.0f} MB{busy}{temperature}</div>")
    if reading.error:
        stale = " (numbers above are the last good reading)" if reading.gpus else ""
        parts.append(f"<div>GPU memory unavailable: {html.escape(reading.error)}{stale}</div>")
    if reading.note is not None:  # the model runs on a backend: what it reports
        parts.append(f"<div>{html.escape(reading.note)}</div>")
    elif not reading.gpus and not reading.error:
        parts.append("<div>No GPU: running on CPU</div>")
    if not reading.gpus and reading.note is None:
        parts.append(f"<div>process memory {process_rss_mb():,.0f} MB</div>")
    state = engine.state()
    health = "running" if state.alive else "<b>stopped</b>"
    parts.append(f"<div class='engine-line'>engine {health} · {waiting} waiting · "
                 f"batch {state.batch_size}/{state.batch_ceiling}</div>"
                 f"<div>{state.tokens_per_s:.0f} tok/s over all replies, last 5 s "
                 f"(a reply's own speed is under it)</div></div>")
    return "".join(parts)


def plots(monitor: ServerMonitor) -> tuple[pd.DataFrame, ...]:
    """The monitor's samples as the four plots' tables: memory, speed, batch, queue."""
    samples = list(monitor.samples)
    times = [pd.Timestamp(s.time, unit="s") for s in samples]
    memory = pd.DataFrame({"time": times, "MB": [s.gpu_used_mb for s in samples]})
    speed = pd.DataFrame({"time": times, "tokens/s": [s.tokens_per_s for s in samples]})
    batch = pd.DataFrame({"time": times, "requests": [s.batch_size for s in samples]})
    queue = pd.DataFrame({"time": times, "requests": [s.queue_depth for s in samples]})
    return memory, speed, batch, queue
