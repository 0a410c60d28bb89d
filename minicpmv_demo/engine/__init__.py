"""The serving engine: one thread owns the model and batches every request."""

from .engine import Engine
from .request import FinishReason, ReplyError, ReplyStats, ReplyStream, SamplingParams

__all__ = ["Engine", "FinishReason", "ReplyError", "ReplyStats", "ReplyStream", "SamplingParams"]
