"""Shared fixtures of the MiniCPM-V 2.5 tests: the tiny checkpoints (built once per run) and their
model and processor. Imported by the test modules that use them."""

from __future__ import annotations

import pytest
import torch


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
