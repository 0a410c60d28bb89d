"""Fixtures of the page's browser tests (a plugin of the root conftest): one app and one Chromium
for the whole run, every test opening tabs of its own. The app's model is held by `HeldRunner`,
so a test can keep a reply in progress."""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path

import pytest

from conftest import HeldRunner
from minicpmv_demo.web.server import App, build_app


CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
        "--disable-component-update", "--disable-sync"]


@dataclass
class Served:
    app: App
    url: str
    runner: HeldRunner
    feedback_log: Path


def serve(settings, loaded, feedback_log: Path) -> Served:
    held = replace(loaded, runner=HeldRunner(loaded.runner))
    app = build_app(replace(settings, feedback_log=str(feedback_log)), held)
    _, url, _ = app.launch(server_port=None, quiet=True)
    return Served(app=app, url=url, runner=held.runner, feedback_log=feedback_log)


@pytest.fixture(scope="session")
def page_app(tiny_settings, loaded_tiny, tmp_path_factory):
    """The page as a visitor meets it (the tiny model, its reasoning not capped, so that a small
    token limit ends a reply inside its reasoning)."""
    served = serve(replace(tiny_settings, cache_size=0, max_new_tokens=1024, max_thinking_tokens=0),
                   loaded_tiny, tmp_path_factory.mktemp("feedback") / "feedback.jsonl")
    yield served
    served.app.close()


@pytest.fixture(scope="session")
def queued_app(tiny_settings, loaded_tiny, tmp_path_factory):
    """A server that answers one question at a time (`--concurrency 1`): others wait in the queue."""
    served = serve(replace(tiny_settings, cache_size=0, concurrency=1, max_batch=1, panel_interval=0.3),
                   loaded_tiny, tmp_path_factory.mktemp("feedback-queued") / "feedback.jsonl")
    yield served
    served.app.close()


@pytest.fixture
def url(page_app) -> str:
    return page_app.url


@pytest.fixture
def held(page_app):
    """The page app's runner: clear its `go` to hold a reply after its first token."""
    yield page_app.runner
    page_app.runner.go.set()


@pytest.fixture(scope="session")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        launched = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield launched
        launched.close()
