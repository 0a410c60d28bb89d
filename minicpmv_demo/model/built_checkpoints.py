"""Where the built-in test checkpoints live, and how one is built once and shared.

The tiny models (minicpmv4/tiny.py, minicpmv2/tiny.py) are built on first use into an ordinary
checkpoint folder under the cache, then loaded like a download. A build goes into a temporary
sibling folder renamed into place, so two processes starting at once (tests, a second app) never
see half a checkpoint.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path


def default_cache_dir() -> Path:
    """Where built models live unless --tiny-model-dir says otherwise."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "minicpmv-demo"


def ensure_built(target: Path, build: Callable[[Path], None]) -> Path:
    """`target`, built by `build(folder)` first unless it holds a checkpoint already."""
    if (target / "config.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".tiny-build-", dir=target.parent))
    try:
        build(staging)
        try:
            staging.rename(target)
        except OSError:
            if not (target / "config.json").exists():  # not a lost race: a real failure
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target
