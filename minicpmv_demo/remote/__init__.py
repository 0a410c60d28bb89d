"""Serving the page from a remote OpenAI-compatible server instead of a model in this process."""

from .engine import BackendClientError, RemoteEngine
from .probe import BackendProbe, BackendStatus

__all__ = ["BackendClientError", "BackendProbe", "BackendStatus", "RemoteEngine"]
