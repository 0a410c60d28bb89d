"""MiniCPM-V 2.5 (MiniCPM-Llama3-V 2.5) as the project's own native transformers model.

Reads the published checkpoints (`openbmb/MiniCPM-Llama3-V-2_5`, its `-int4` twin) with plain
`from_pretrained`, no `trust_remote_code`, and computes what the release's own code computes
(checked against it: see the report of branch v25-model). One file per concern:

- config.py: `MiniCPMV25Config` (the release's config.json), `SliceSettings`
- modeling.py: `MiniCPMV25` (llm / vpm / resampler; `vision_features`, `embed_prompt`)
- resampler.py: the perceiver resampler and its 2-D sine-cosine position table
- slicing.py: pictures to slices and pixels
- processing.py: `MiniCPMV25Processor` (chat format, placeholders, ids, stop ids, token counts)
- tokenizer.py: the checkpoint's tokenizer through transformers' generic fast tokenizer
- tiny.py: tiny offline checkpoints for tests

Names are imported lazily, so `import minicpmv_demo.model.minicpmv2.tiny` stays light.
"""

from __future__ import annotations

import importlib
import json
import os
from pathlib import Path

_EXPORTS = {
    "MiniCPMV25Config": "config", "SliceSettings": "config",
    "MiniCPMVBase": "modeling", "MiniCPMV25": "modeling",
    "Resampler": "resampler",
    "SlicedPicture": "slicing",
    "EncodedPrompt": "processing", "MiniCPMV25Processor": "processing",
    "load_tokenizer": "tokenizer",
    "ensure_tiny_v25": "tiny",
}
VERSIONS = ("2.5",)

__all__ = [*_EXPORTS, "load", "checkpoint_version"]


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def checkpoint_version(folder: str | os.PathLike) -> str:
    """"2.5" (or "2.6") for a MiniCPM-V 2.x checkpoint folder, from its config.json."""
    config = json.loads((Path(folder) / "config.json").read_text())
    if config.get("model_type") != "minicpmv":
        raise ValueError(f"{folder} is not a MiniCPM-V 2.x checkpoint (model_type {config.get('model_type')!r})")
    version = str(config.get("version", "2.5"))
    if version not in VERSIONS:
        raise ValueError(f"MiniCPM-V {version} is not supported natively (supported: {', '.join(VERSIONS)})")
    return version


def load(folder: str | os.PathLike, **from_pretrained_kwargs):
    """(model, processor) of a local checkpoint folder; keyword arguments go to `from_pretrained`
    (`dtype`, `device_map`, `quantization_config`, `attn_implementation`, ...)."""
    checkpoint_version(folder)
    from .modeling import MiniCPMV25
    from .processing import MiniCPMV25Processor

    model = MiniCPMV25.from_pretrained(str(folder), **from_pretrained_kwargs).eval()
    return model, MiniCPMV25Processor.from_pretrained(folder)
