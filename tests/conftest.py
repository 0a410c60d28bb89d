"""Shared fixtures: the built-in tiny model (built once per run) and helpers to start engines.

Everything here is real: the tiny model is the real MiniCPM-V 4.6 architecture loaded through the
same code as a downloaded checkpoint; engines run their own thread; apps are real Gradio servers.
"""

from __future__ import annotations

import os
import threading

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from pathlib import Path

import pytest
import torch

from minicpmv_demo.intake.conversation import Conversation, Turn
from minicpmv_demo.engine import Engine
from minicpmv_demo.intake.images import prepare_image
from minicpmv_demo.model import load_model
from minicpmv_demo.model.minicpmv4.runner import MiniCPMV4Runner
from minicpmv_demo.config.settings import Settings

ASSETS = Path(__file__).resolve().parent.parent / "assets"

torch.set_num_threads(min(2, os.cpu_count() or 1))

pytest_plugins = ["browser_fixtures"]  # the page's browser tests: one app and one Chromium per run


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("tiny-cache"))


@pytest.fixture(scope="session")
def tiny_settings(tiny_dir) -> Settings:
    return Settings(model="tiny", tiny_model_dir=tiny_dir)


@pytest.fixture(scope="session")
def loaded_tiny(tiny_settings):
    return load_model(tiny_settings)


@pytest.fixture
def make_engine(loaded_tiny):
    """Start engines on the tiny model's runner; every engine is shut down after the test."""
    engines = []

    def start(runner=None, started: bool = True, **options) -> Engine:
        """`started=False` lets a test queue requests first, so they arrive 'at the same time'."""
        options.setdefault("cache_size", 0)
        engine = Engine(runner or loaded_tiny.runner, **options)
        engines.append(engine)
        return engine.start() if started else engine

    yield start
    for engine in engines:
        if engine.alive:
            engine.shutdown()


class HeldRunner(MiniCPMV4Runner):
    """The tiny model's runner, whose decode steps wait while `go` is clear.

    A test clears `go`, asks, reads the reply's first piece (the prefill's token), then sets
    `go`: the rest is made only after the first piece was seen, on a machine of any speed.
    """

    def __init__(self, runner: MiniCPMV4Runner) -> None:
        super().__init__(runner.model, runner.processor, thinks_by_default=runner.thinks_by_default)
        self.go = threading.Event()
        self.go.set()

    def step(self, batch, tokens):
        self.go.wait(60)
        return super().step(batch, tokens)


class OutOfMemoryModel:
    """Wraps the tiny model and raises CUDA's out-of-memory error past a batch size or prompt
    length, as a GPU would; everything else runs the real model."""

    def __init__(self, real, max_rows: int, max_prompt: int = 10_000, phase: str = "both") -> None:
        self.real, self.max_rows, self.max_prompt, self.phase = real, max_rows, max_prompt, phase
        self.calls: list[tuple[int, int]] = []  # (rows, tokens per row) of every text-model call
        self.vision_calls = 0
        self.refusals = 0
        self.model = _Guarded(self)

    def __getattr__(self, name):
        return getattr(self.real, name)

    def check(self, input_ids) -> None:
        rows, length = input_ids.shape
        self.calls.append((rows, length))
        if self.phase != "both" and self.phase != ("step" if length == 1 else "prefill"):
            return
        if rows > self.max_rows or length > self.max_prompt:
            self.refusals += 1
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")


class _Guarded:
    """The wrapper's `.model`: checks each call, then runs the real text+vision stack."""

    def __init__(self, owner: OutOfMemoryModel) -> None:
        self.owner = owner

    def __getattr__(self, name):
        return getattr(self.owner.real.model, name)

    def __call__(self, **inputs):
        self.owner.check(inputs["input_ids"])
        return self.owner.real.model(**inputs)

    def get_image_features(self, *args, **kwargs):
        self.owner.vision_calls += 1
        return self.owner.real.model.get_image_features(*args, **kwargs)


def launch_app(settings: Settings, loaded):
    """A real app on a free loopback port; returns it and its URL (close it when done)."""
    from minicpmv_demo.web.server import build_app

    app = build_app(settings, loaded)
    _, url, _ = app.launch(server_port=None, quiet=True)
    return app, url


def asset_image(name: str):
    return prepare_image(ASSETS / name)


def ask(text: str, *image_names: str, history: tuple[Turn, ...] = ()) -> Conversation:
    """A conversation whose last turn asks `text` about the named example images."""
    turn = Turn(role="user", text=text, images=tuple(asset_image(n) for n in image_names))
    return Conversation(turns=(*history, turn))


def wait_until(condition, timeout: float = 10.0) -> bool:
    """Poll `condition` until it holds or `timeout` passes; returns whether it held."""
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.005)
    return condition()


def run_concurrently(task, count: int, timeout: float = 120.0) -> list:
    """Run `task(i)` for i in range(count) on `count` threads at once; return the results in order,
    or raise the first error a thread hit."""
    import threading

    results, errors = [None] * count, []

    def worker(i):
        try:
            results[i] = task(i)
        except Exception as exc:  # noqa: BLE001 - re-raised below, on the test's thread
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout)
    if errors:
        raise errors[0]
    return results
