"""GPU and process memory, read cheaply and safely for the reply line, the live panel and /gpu_memory.

GPUtil forks `nvidia-smi` on every call and waits for it with no timeout. Every open tab polls
the panel and every finished reply asks once, so `GpuMemory` caches a reading for a short time
and runs the query on a background thread it gives up waiting for after a timeout: a hung or
broken `nvidia-smi` becomes a short message on the page, never a frozen server or a pile of
stuck processes. Torch's own counters (allocated, reserved, peak) cost nothing and are read
directly.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import psutil
import torch

log = logging.getLogger(__name__)

MB = 2**20  # nvidia-smi's "MiB", which it and most people write as MB


@dataclass(frozen=True)
class GpuInfo:
    """One GPU as nvidia-smi reports it (memory in MB)."""

    index: int
    name: str
    memory_used_mb: float
    memory_total_mb: float
    memory_free_mb: float
    utilization_pct: float  # NaN where nvidia-smi says [N/A], e.g. with MIG enabled
    temperature_c: float | None


@dataclass(frozen=True)
class GpuReading:
    """The GPUs, or why they could not be read.

    `error` is None when the reading is fine; zero GPUs with no error means this machine has no
    (NVIDIA) GPU. After a timeout `gpus` still holds the last good reading, marked by the error.
    """

    gpus: tuple[GpuInfo, ...]
    error: str | None
    note: str | None = None  # the model runs on a backend: what it says about its memory


class _Query:
    """One `nvidia-smi` run in flight: finished when `done` is set, overdue after `deadline`."""

    def __init__(self, deadline: float) -> None:
        self.done = threading.Event()
        self.deadline = deadline


class GpuMemory:
    """Cached, time-bounded GPU readings; safe to call often and from any thread."""

    def __init__(self, ttl_s: float = 1.0, timeout_s: float = 3.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        """`clock` dates the readings (how old the latest is); waiting for nvidia-smi uses real time."""
        self.ttl_s = ttl_s
        self.timeout_s = timeout_s
        self._clock = clock
        self._lock = threading.Lock()
        self._reading: GpuReading | None = None  # the latest finished query's result
        self._read_at = -math.inf  # `clock()` when it finished
        self._last_good: tuple[GpuInfo, ...] = ()  # shown, with an error, while nvidia-smi hangs
        self._query: _Query | None = None  # at most one: a stuck nvidia-smi is never started again
        self._logged_error: str | None = None

    def read(self) -> GpuReading:
        """The latest reading, at most `ttl_s` old; waits at most `timeout_s` for a new one."""
        with self._lock:
            if self._reading is not None and self._clock() - self._read_at < self.ttl_s:
                return self._reading
            query = self._query or self._start_query()
        query.done.wait(max(0.0, query.deadline - time.monotonic()))
        with self._lock:
            if query.done.is_set():
                return self._reading
            return self._timed_out()

    def snapshot(self) -> dict:
        """Everything about memory as strict JSON (no NaN), for the /gpu_memory endpoint."""
        reading = self.read()
        return {
            "gpus": [without_nan(asdict(gpu)) for gpu in reading.gpus],
            "error": reading.error,
            "torch": torch_memory(),
            "process": {"rss_mb": process_rss_mb()},
        }

    def _start_query(self) -> _Query:
        """Run `nvidia-smi` on a daemon thread, so a hang never holds up a caller or shutdown."""
        query = self._query = _Query(deadline=time.monotonic() + self.timeout_s)
        threading.Thread(target=self._run, args=(query,), name="gpu-memory-query", daemon=True).start()
        return query

    def _run(self, query: _Query) -> None:
        reading = query_gpus()
        with self._lock:
            self._reading, self._read_at, self._query = reading, self._clock(), None
            if reading.gpus:
                self._last_good = reading.gpus
            self._log_once(reading.error)
            query.done.set()

    def _timed_out(self) -> GpuReading:
        error = f"nvidia-smi did not answer within {self.timeout_s:g} s"
        self._log_once(error)
        return GpuReading(gpus=self._last_good, error=error)

    def _log_once(self, error: str | None) -> None:
        """Log a new failure once, not on every poll; a good reading re-arms the warning."""
        if error and error != self._logged_error:
            log.warning("GPU memory unavailable: %s", error)
        self._logged_error = error


def query_gpus() -> GpuReading:
    """One GPUtil call, with every way it can fail turned into an error text.

    GPUtil turns a missing `nvidia-smi` (and one that prints nothing, whatever its exit status)
    into an empty list, which we report as "no GPU". Anything else it cannot parse (a driver
    failure message, "No devices were found", garbage) makes it raise.
    """
    try:
        import GPUtil  # lazily: GPUtil 1.4 imports distutils, gone in Python 3.12 without setuptools
    except Exception as exc:  # noqa: BLE001 - any import failure only means "no GPU readings"
        return GpuReading(gpus=(), error=f"GPUtil is not installed/importable: {exc}")
    try:
        return GpuReading(gpus=tuple(_info(gpu) for gpu in GPUtil.getGPUs()), error=None)
    except Exception as exc:  # noqa: BLE001 - GPUtil parses nvidia-smi's text without any checks
        return GpuReading(gpus=(), error=f"nvidia-smi gave an unreadable answer ({exc})")


def _info(gpu) -> GpuInfo:
    """Our copy of a GPUtil.GPU; GPUtil writes NaN for values nvidia-smi reports as [N/A]."""
    temperature = float(gpu.temperature)
    return GpuInfo(
        index=int(gpu.id),
        name=str(gpu.name),
        memory_used_mb=float(gpu.memoryUsed),
        memory_total_mb=float(gpu.memoryTotal),
        memory_free_mb=float(gpu.memoryFree),
        utilization_pct=round(float(gpu.load) * 100, 1),
        temperature_c=None if math.isnan(temperature) else temperature,
    )


def without_nan(values: dict) -> dict:
    """NaN is not JSON (browsers' JSON.parse rejects it): send null instead."""
    return {key: None if isinstance(value, float) and math.isnan(value) else value
            for key, value in values.items()}


def torch_memory() -> dict:
    """Torch's allocator counters, in MB, summed over visible GPUs (zeros and no peak without CUDA).

    Reading them never initialises CUDA: torch answers zero for devices it has not started.
    """
    if not torch.cuda.is_available():
        return {"cuda": False, "allocated_mb": 0.0, "reserved_mb": 0.0, "peak_allocated_mb": None}
    devices = range(torch.cuda.device_count())
    return {
        "cuda": True,
        "allocated_mb": sum(torch.cuda.memory_allocated(d) for d in devices) / MB,
        "reserved_mb": sum(torch.cuda.memory_reserved(d) for d in devices) / MB,
        "peak_allocated_mb": peak_memory_mb(),
    }


def reset_peak_memory() -> None:
    """Start a new peak measurement (the engine does this when its batch empties).

    Skipped until torch has started CUDA: resetting would create a context (hundreds of MB) on
    every GPU of a process that runs on the CPU.
    """
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for device in range(torch.cuda.device_count()):
            torch.cuda.reset_peak_memory_stats(device)


def peak_memory_mb() -> float | None:
    """The largest peak torch allocated on any one GPU since the last reset, in MB; None without CUDA."""
    if not torch.cuda.is_available():
        return None
    return max(torch.cuda.max_memory_allocated(d) for d in range(torch.cuda.device_count())) / MB


def process_rss_mb() -> float:
    """This process's resident memory in MB: what a CPU-only run uses instead of GPU memory."""
    return psutil.Process().memory_info().rss / MB


def describe_gpus(reading: GpuReading) -> str:
    """One short line for people: each GPU's name and memory, or why there is none."""
    if reading.note is not None:  # the model runs elsewhere: the backend's memory is what counts
        local = " · ".join(f"{gpu.name} {gpu.memory_used_mb:,.0f} / {gpu.memory_total_mb:,.0f} MB"
                           for gpu in reading.gpus)
        return f"{reading.note} · here: {local}" if local else reading.note
    if reading.gpus:
        line = " · ".join(f"{gpu.name} {gpu.memory_used_mb:,.0f} / {gpu.memory_total_mb:,.0f} MB"
                          for gpu in reading.gpus)
        return f"{line} (stale: {reading.error})" if reading.error else line
    if reading.error:
        return f"GPU memory unavailable: {reading.error}"
    return "No GPU: running on CPU"


def usable_bytes(devices: list[torch.device], utilization: float) -> int | None:
    """GPU memory the process may still fill on `devices` under `utilization` (the share of each
    card it may use), on the device with the least; None on the CPU, where the operating system
    decides. What torch's allocator keeps reserved but unused counts as free."""
    cards = sorted({torch.device(d).index or 0 for d in devices if torch.device(d).type == "cuda"})
    if not cards or not torch.cuda.is_available():
        return None
    room = []
    for card in cards:
        free, total = torch.cuda.mem_get_info(card)
        idle = torch.cuda.memory_reserved(card) - torch.cuda.memory_allocated(card)
        room.append(int(free + idle - (1.0 - utilization) * total))
    return max(0, min(room))
