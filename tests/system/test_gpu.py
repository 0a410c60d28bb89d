"""The GPU memory reader, driven through GPUtil's real parsing by a fake `nvidia-smi` on PATH."""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from minicpmv_demo.system.gpu import (GpuInfo, GpuMemory, GpuReading, describe_gpus, peak_memory_mb,
                               process_rss_mb, reset_peak_memory, torch_memory)

# GPUtil 1.4 asks for: index, uuid, utilization.gpu, memory.total, memory.used, memory.free,
# driver_version, name, gpu_serial, display_active, display_mode, temperature.gpu
# with --format=csv,noheader,nounits.
A10G = "0, GPU-aaaa, 37, 23028, 10240, 12788, 550.54, NVIDIA A10G, 1324, Disabled, Enabled, 61\n"
T4 = "1, GPU-bbbb, 5, 16384, 1024, 15360, 550.54, Tesla T4, 1325, Disabled, Enabled, 40\n"
MIG = "0, GPU-cccc, [N/A], 81559, 4000, 77559, 550.54, NVIDIA H100 80GB HBM3, 1326, Disabled, Enabled, [N/A]\n"
QUERY = ("--query-gpu=index,uuid,utilization.gpu,memory.total,memory.used,memory.free,driver_version,"
         "name,gpu_serial,display_active,display_mode,temperature.gpu --format=csv,noheader,nounits")


class FakeSmi:
    """A fake `nvidia-smi` first on PATH that logs each call's arguments, one line per call."""

    def __init__(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        self.dir = tmp_path
        self.calls_file = tmp_path / "calls"
        self.pid_file = tmp_path / "hung.pid"
        (tmp_path / "bin").mkdir()
        monkeypatch.setenv("PATH", os.pathsep.join([str(tmp_path / "bin"), "/usr/bin", "/bin"]))

    def install(self, stdout: str = "", exit_code: int = 0, hang_on_call: int = 0) -> None:
        """Print `stdout` byte for byte and exit; call number `hang_on_call` sleeps 30 s instead."""
        (self.dir / "stdout").write_text(stdout)
        script = self.dir / "bin" / "nvidia-smi"
        script.write_text(
            "#!/bin/sh\n"
            f'echo "$*" >> "{self.calls_file}"\n'
            f'if [ "$(wc -l < "{self.calls_file}")" -eq {hang_on_call} ]; then\n'
            f'  echo $$ > "{self.pid_file}"; exec sleep 30\n'
            "fi\n"
            f'cat "{self.dir / "stdout"}"\n'
            f"exit {exit_code}\n")
        script.chmod(0o755)

    @property
    def calls(self) -> list[str]:
        return self.calls_file.read_text().splitlines() if self.calls_file.exists() else []

    def unhang(self) -> None:
        """End the sleeping fake, as an nvidia-smi that finally answers (with nothing) would."""
        if self.pid_file.exists():
            try:
                os.kill(int(self.pid_file.read_text()), signal.SIGKILL)
            except ProcessLookupError:
                pass


@pytest.fixture
def smi(tmp_path, monkeypatch):
    fake = FakeSmi(tmp_path, monkeypatch)
    yield fake
    fake.unhang()  # never leave a sleeping process behind a failed test


def test_one_gpu_every_field_through_gputil_query(smi):
    smi.install(A10G)
    reading = GpuMemory().read()
    assert reading == GpuReading(gpus=(GpuInfo(index=0, name="NVIDIA A10G", memory_used_mb=10240.0,
                                               memory_total_mb=23028.0, memory_free_mb=12788.0,
                                               utilization_pct=37.0, temperature_c=61.0),),
                                 error=None)
    assert smi.calls == [QUERY], "the fake must answer the command line GPUtil really runs"
    assert describe_gpus(reading) == "NVIDIA A10G 10,240 / 23,028 MB"


def test_two_gpus(smi):
    smi.install(A10G + T4)
    reading = GpuMemory().read()
    assert [(g.index, g.name, g.memory_used_mb, g.temperature_c) for g in reading.gpus] == [
        (0, "NVIDIA A10G", 10240.0, 61.0), (1, "Tesla T4", 1024.0, 40.0)]
    assert describe_gpus(reading) == "NVIDIA A10G 10,240 / 23,028 MB · Tesla T4 1,024 / 16,384 MB"


def test_zero_gpus_is_no_gpu_not_an_error(smi):
    smi.install("")
    reading = GpuMemory().read()
    assert reading == GpuReading(gpus=(), error=None)
    assert describe_gpus(reading) == "No GPU: running on CPU"


def test_nvidia_smi_missing_is_no_gpu(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    assert GpuMemory().read() == GpuReading(gpus=(), error=None)


def test_gputil_unimportable(monkeypatch):
    monkeypatch.setitem(sys.modules, "GPUtil", None)  # makes `import GPUtil` raise ImportError
    reading = GpuMemory().read()
    assert reading.gpus == () and reading.error.startswith("GPUtil is not installed/importable: ")
    assert describe_gpus(reading).startswith("GPU memory unavailable: GPUtil is not installed")


@pytest.mark.parametrize("stdout, exit_code, shown", [
    ("NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver.\n", 9,
     "NVIDIA-SMI has failed"),
    ("No devices were found\n", 6, "No devices were found"),
    ("garbage, here\n", 0, "garbage"),
    ("0, GPU-aaaa, 37\n", 0, "unreadable"),  # too few fields
    ("0, GPU-aaaa, 37, 0, 0, 0, 550.54, Broken, 1, Disabled, Enabled, 30\n", 0, "unreadable"),  # 0 MB total
])
def test_failures_become_one_line(smi, stdout, exit_code, shown):
    smi.install(stdout, exit_code)
    reading = GpuMemory().read()
    assert reading.gpus == () and shown in reading.error
    assert describe_gpus(reading).startswith("GPU memory unavailable: nvidia-smi gave an unreadable answer")


def test_non_zero_exit_without_output_reads_as_no_gpu(smi):
    """GPUtil ignores the exit status: a silent failure looks exactly like zero GPUs."""
    smi.install("", exit_code=9)
    assert GpuMemory().read() == GpuReading(gpus=(), error=None)


def test_values_nvidia_smi_does_not_know_are_null_in_json(smi):
    smi.install(MIG)  # MIG mode: no utilization; some boards: no temperature
    memory = GpuMemory()
    gpu = memory.read().gpus[0]
    assert math.isnan(gpu.utilization_pct) and gpu.temperature_c is None
    snapshot = json.loads(json.dumps(memory.snapshot(), allow_nan=False))
    assert snapshot["gpus"][0]["utilization_pct"] is None and snapshot["gpus"][0]["memory_used_mb"] == 4000


def test_snapshot_is_strict_json(smi):
    smi.install(A10G + T4)
    snapshot = json.loads(json.dumps(GpuMemory().snapshot(), allow_nan=False))
    assert [g["name"] for g in snapshot["gpus"]] == ["NVIDIA A10G", "Tesla T4"]
    assert snapshot["gpus"][1]["memory_free_mb"] == 15360 and snapshot["error"] is None
    assert set(snapshot["torch"]) == {"cuda", "allocated_mb", "reserved_mb", "peak_allocated_mb"}
    assert snapshot["process"]["rss_mb"] > 0


def test_readings_are_cached_for_the_ttl(smi):
    smi.install(A10G)
    now = [100.0]
    memory = GpuMemory(ttl_s=1.0, clock=lambda: now[0])
    assert memory.read() is memory.read()
    now[0] += 0.9
    memory.read()
    assert len(smi.calls) == 1
    now[0] += 0.2
    memory.read()
    assert len(smi.calls) == 2


def test_errors_are_cached_and_logged_once(smi, caplog):
    smi.install("garbage\n")
    memory = GpuMemory(ttl_s=0)
    with caplog.at_level(logging.WARNING, logger="minicpmv_demo.system.gpu"):
        for _ in range(3):
            memory.read()
    assert len(smi.calls) == 3
    assert len(caplog.records) == 1 and "unreadable" in caplog.records[0].getMessage()


def test_hanging_nvidia_smi_times_out_keeps_last_reading_and_never_piles_up(smi):
    smi.install(A10G, hang_on_call=2)
    memory = GpuMemory(ttl_s=0, timeout_s=2)
    good = memory.read()
    assert good.error is None

    started = time.monotonic()
    stuck = memory.read()
    assert time.monotonic() - started >= 2, "the first reader waits its timeout"
    assert stuck == GpuReading(gpus=good.gpus, error="nvidia-smi did not answer within 2 s")
    assert describe_gpus(stuck) == "NVIDIA A10G 10,240 / 23,028 MB (stale: nvidia-smi did not answer within 2 s)"

    # While it is stuck, everyone gets the stale reading at once and nothing new is started:
    # 8 readers that each waited the timeout would take at least 2 s.
    results: list[GpuReading] = []
    started = time.monotonic()
    readers = [threading.Thread(target=lambda: results.append(memory.read())) for _ in range(8)]
    for reader in readers:
        reader.start()
    for reader in readers:
        reader.join()
    assert time.monotonic() - started < 2
    assert results == [stuck] * 8
    assert len(smi.calls) == 2

    # Once it finally returns, the next query runs and reads the GPU again.
    smi.unhang()
    deadline = time.monotonic() + 5
    while memory.read().error is not None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert memory.read() == good and len(smi.calls) >= 3


def test_describe_gpus_without_gpu_or_with_an_error():
    assert describe_gpus(GpuReading(gpus=(), error=None)) == "No GPU: running on CPU"
    assert describe_gpus(GpuReading(gpus=(), error="nvidia-smi did not answer within 3 s")) == (
        "GPU memory unavailable: nvidia-smi did not answer within 3 s")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only answers")
def test_torch_memory_on_cpu():
    assert torch_memory() == {"cuda": False, "allocated_mb": 0.0, "reserved_mb": 0.0, "peak_allocated_mb": None}
    assert peak_memory_mb() is None
    reset_peak_memory()  # a no-op, not an error
    assert process_rss_mb() > 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_torch_memory_on_cuda():
    reset_peak_memory()
    block = torch.empty(64 * 2**20, dtype=torch.uint8, device="cuda")
    del block
    memory = torch_memory()
    assert memory["cuda"] is True and memory["reserved_mb"] >= 64
    assert peak_memory_mb() >= 64 and memory["peak_allocated_mb"] == peak_memory_mb()
    reset_peak_memory()
    assert peak_memory_mb() < 64
