"""Model loading and the runners that execute model work for the engine."""

from .loading import LoadedModel, ModelLoadError, load_model

__all__ = ["LoadedModel", "ModelLoadError", "load_model"]
