"""One GPU-check stage's JSON file, rewritten whenever the stage learns something.

A lent GPU runs one command of at most 10 minutes and may be cut at any moment; what a killed
run printed can be lost, but a file under $OUT comes back. So a stage writes its file as soon
as it starts and again after every measurement: a cut stage keeps what it measured, and the
driver then marks it `timeout`. Each file carries the machine, the versions and the date, and
every number that has a floor or ceiling carries it beside it (`checks`).
"""

from __future__ import annotations

import json
import math
import os
import platform
import socket
import subprocess
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from engine_bench import say

# Statuses: a stage is `running` until it ends as one of the others.
PASS, FAIL, ERROR, TIMEOUT, SKIPPED, RUNNING = "pass", "fail", "error", "timeout", "skipped", "running"
PACKAGES = ("torch", "transformers", "huggingface_hub", "tokenizers", "accelerate", "bitsandbytes", "kernels",
            "safetensors")


def utc_now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def json_safe(value: Any) -> Any:
    """JSON has no NaN or infinity: such numbers become null; tuples become lists."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def write_json(path: Path, data: dict) -> None:
    """Write whole or not at all: a reader (or a cut run) never sees half a file."""
    staging = path.with_name(f".{path.name}.part")
    staging.write_text(json.dumps(json_safe(data), indent=1, default=str) + "\n")
    os.replace(staging, path)


def package_versions() -> dict[str, str | None]:
    """Installed versions, read from metadata (no import: bitsandbytes loads CUDA when imported)."""
    found = {}
    for name in PACKAGES:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = None
    return found


def machine(device: str) -> dict:
    """Where this ran: host, processor, GPUs as torch sees them (in a stage, never the driver:
    the driver forks the stages and must not touch CUDA), the driver's version."""
    import torch

    info = {"host": socket.gethostname(), "platform": platform.platform(), "python": platform.python_version(),
            "cpus": os.cpu_count(), "torch_cuda": torch.version.cuda, "gpus": []}
    if device.startswith("cuda") and torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(index)
            info["gpus"].append({"index": index, "name": props.name, "memory_gb": round(props.total_memory / 1e9, 1),
                                 "capability": f"{props.major}.{props.minor}"})
        info["driver"] = nvidia_smi("driver_version")
    return info


def nvidia_smi(field: str) -> str | None:
    try:
        return subprocess.run(["nvidia-smi", f"--query-gpu={field}", "--format=csv,noheader"], capture_output=True,
                              text=True, timeout=10, check=True).stdout.splitlines()[0].strip()
    except (OSError, subprocess.SubprocessError, IndexError):
        return None


class StageReport:
    """The stage's file: `results` (what it measured), `checks` (numbers against their bounds),
    `notes`; written again after every change."""

    def __init__(self, path: Path, index: int, name: str, title: str, limit_s: float, context: dict) -> None:
        self.path, self.name = path, name
        self._started = time.perf_counter()
        self.data: dict[str, Any] = {"stage": name, "index": index, "title": title, "status": RUNNING,
                                     "started_at": utc_now(), "elapsed_s": 0.0, "limit_s": round(limit_s, 1),
                                     **context, "checks": [], "results": {}, "notes": []}
        self.write()

    def say(self, message: str) -> None:
        say(f"{self.name}: {message}")

    def set(self, key: str, value: Any) -> None:
        """Record a result (a number, or a dict of them) and write the file."""
        self.data["results"][key] = value
        self.write()

    def check(self, name: str, value: Any, bound: str, ok: bool | None) -> bool | None:
        """A number beside its bound; `ok` None: the bound does not apply here (say, an H100
        floor on a CPU). Returns `ok`."""
        self.data["checks"].append({"name": name, "value": value, "bound": bound, "ok": ok})
        verdict = "not applied" if ok is None else ("ok" if ok else "FAILED")
        self.say(f"check {name}: {value} (bound {bound}) {verdict}")
        self.write()
        return ok

    def note(self, text: str) -> None:
        self.data["notes"].append(text)
        self.say(text)
        self.write()

    @property
    def failed(self) -> bool:
        return any(check["ok"] is False for check in self.data["checks"])

    def finish(self, status: str | None = None, error: str | None = None) -> str:
        """End the stage: `status` as given, else fail if any check failed, else pass."""
        self.data["status"] = status or (FAIL if self.failed else PASS)
        if error:
            self.data["error"] = error
        self.write()
        self.say(f"{self.data['status']} in {self.data['elapsed_s']:.1f} s")
        return self.data["status"]

    def write(self) -> None:
        self.data["elapsed_s"] = round(time.perf_counter() - self._started, 2)
        write_json(self.path, self.data)


def read_stage(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None
