"""The memory line when the model runs on a backend: its memory matters, this machine's GPUs too."""

from __future__ import annotations

from dataclasses import asdict, replace

from ..system.gpu import GpuMemory, GpuReading, without_nan
from .probe import BackendProbe


class BackendMemory:
    """`GpuMemory`'s interface for a front end: local GPUs (GPUtil, if any) plus a note saying
    what the backend reports about its own memory (or that it reports nothing)."""

    def __init__(self, local: GpuMemory, probe: BackendProbe) -> None:
        self.local = local
        self.probe = probe

    def read(self) -> GpuReading:
        return replace(self.local.read(), note=self.probe.status.memory_note)

    def snapshot(self) -> dict:
        status = self.probe.status
        backend = {key: value for key, value in asdict(status).items() if key != "gpus"}
        backend["gpus"] = [without_nan(asdict(gpu)) for gpu in status.gpus]
        return self.local.snapshot() | {"backend": backend | {"summary": status.memory_note}}
