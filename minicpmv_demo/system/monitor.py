"""The server's recent history (GPU memory, tokens/s, queue depth, batch size) for the plots.

One background thread samples every few seconds, whatever the number of open tabs; tabs only
read what is already there, so a page refresh never costs an `nvidia-smi` call of its own.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass

from .gpu import GpuMemory, process_rss_mb
from .process_memory import trim


@dataclass(frozen=True)
class Sample:
    time: float  # seconds since the epoch
    gpu_used_mb: float  # all GPUs together; the process's memory on a CPU-only machine
    tokens_per_s: float
    queue_depth: int
    batch_size: int


class ServerMonitor:
    def __init__(self, engine, gpu: GpuMemory, interval_s: float = 2.0, window_s: float = 600.0) -> None:
        self.engine = engine
        self.gpu = gpu
        self.interval_s = interval_s
        self.samples: deque[Sample] = deque(maxlen=max(1, int(window_s / interval_s)))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="server-monitor", daemon=True)

    def start(self) -> ServerMonitor:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append(self.sample())
            # A large request (a long chat, a big upload) is read in many small blocks that
            # glibc keeps in its arenas once freed: hand them back, whoever allocated them.
            trim()
            self._stop.wait(self.interval_s)

    def sample(self) -> Sample:
        reading = self.gpu.read()
        state = self.engine.state()
        used = sum(g.memory_used_mb for g in reading.gpus) if reading.gpus else process_rss_mb()
        return Sample(time=time.time(), gpu_used_mb=used, tokens_per_s=state.tokens_per_s,
                      queue_depth=state.queue_depth, batch_size=state.batch_size)
