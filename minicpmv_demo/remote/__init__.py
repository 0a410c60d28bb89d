"""Serving the page from a remote OpenAI-compatible server instead of a model in this process."""

from .engine import RemoteEngine
from .probe import BackendProbe, BackendStatus

__all__ = ["BackendProbe", "BackendStatus", "RemoteEngine"]
