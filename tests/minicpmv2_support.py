"""Shared fixtures of the MiniCPM-V 2.5 / 2.6 tests: the tiny checkpoints (built once per run), their
model and processor, and a runner whose decode steps a test lets through one by one. Imported by
the test modules that use them."""

from __future__ import annotations

import threading

import pytest
import torch

from minicpmv_demo.model.minicpmv2.runner import MiniCPMV2Runner


@pytest.fixture(scope="session")
def v25_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("minicpmv2-tiny")


@pytest.fixture(scope="session")
def tiny_v25_dir(v25_cache):
    from minicpmv_demo.model.minicpmv2.tiny import ensure_tiny_v25

    return ensure_tiny_v25(v25_cache)


@pytest.fixture(scope="session")
def tiny_v25_int4_dir(v25_cache):
    from minicpmv_demo.model.minicpmv2.tiny import ensure_tiny_v25

    return ensure_tiny_v25(v25_cache, quantized=True)


@pytest.fixture(scope="session")
def v25_processor(tiny_v25_dir):
    from minicpmv_demo.model.minicpmv2 import MiniCPMV25Processor

    return MiniCPMV25Processor.from_pretrained(tiny_v25_dir)


@pytest.fixture(scope="session")
def v25_model(tiny_v25_dir):
    from minicpmv_demo.model.minicpmv2 import MiniCPMV25

    return MiniCPMV25.from_pretrained(tiny_v25_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def tiny_v26_dir(v25_cache):
    from minicpmv_demo.model.minicpmv2 import ensure_tiny_v26

    return ensure_tiny_v26(v25_cache)


class GatedRunner(MiniCPMV2Runner):
    """A 2.x runner whose decode steps each wait for a permit (`allow`), so a test decides how far
    generation gets before it looks, on a machine of any speed. Prefills are not held.
    `largest_batch` is the most rows a step ran."""

    def __init__(self, runner: MiniCPMV2Runner) -> None:
        super().__init__(runner.model, runner.processor)
        self._permits = threading.Semaphore(0)
        self._open = threading.Event()
        self.steps = 0
        self.largest_batch = 0

    def allow(self, steps: int) -> None:
        self._permits.release(steps)

    def allow_all(self) -> None:
        self._open.set()
        self._permits.release()  # wakes a step already waiting

    def hold(self) -> None:
        """Steps wait for permits again (none left over)."""
        self._open.clear()
        while self._permits.acquire(blocking=False):
            pass

    def step(self, batch, tokens):
        if not self._open.is_set() and not self._permits.acquire(timeout=120):
            raise TimeoutError("no permit for a decode step within 120 s")
        self.steps += 1
        self.largest_batch = max(self.largest_batch, batch.size)
        return super().step(batch, tokens)
