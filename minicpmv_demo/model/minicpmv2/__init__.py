"""MiniCPM-V 2.5 (MiniCPM-Llama3-V 2.5) and 2.6 as the project's own native transformers models.

Reads the published checkpoints (`openbmb/MiniCPM-Llama3-V-2_5`, `openbmb/MiniCPM-V-2_6` and their
`-int4` twins) with plain `from_pretrained`, no `trust_remote_code`. 2.5 computes what the 2.5
release's own code computes (checked against it, token for token); 2.6 is 2.5 with small overrides
written from the 2.6 release's documented behaviour (not run against its code). One file per concern:

- config.py: `MiniCPMV25Config`, `MiniCPMV26Config` (the releases' config.json), `SliceSettings`
- modeling.py: `MiniCPMV25`, `MiniCPMV26` (llm / vpm / resampler; `vision_features`, `embed_prompt`)
- vision.py: 2.6's vision forward (NaViT positions per slice) on Idefics2's SigLIP modules
- resampler.py: the perceiver resampler and its 2-D sine-cosine position table
- slicing.py: pictures to slices and pixels
- processing.py: `MiniCPMV25Processor`, `MiniCPMV26Processor` (chat format, placeholders, ids,
  stop ids, token counts)
- tokenizer.py: the checkpoint's tokenizer through transformers' generic fast tokenizer
- tiny.py: tiny offline checkpoints for tests

Names are imported lazily, so `import minicpmv_demo.model.minicpmv2.tiny` stays light.
"""

from __future__ import annotations

import importlib
import json
import os

_EXPORTS = {
    "MiniCPMV25Config": "config", "MiniCPMV26Config": "config", "SliceSettings": "config",
    "MiniCPMVBase": "modeling", "MiniCPMV25": "modeling", "MiniCPMV26": "modeling", "model_class": "modeling",
    "Resampler": "resampler",
    "SlicedPicture": "slicing",
    "EncodedPrompt": "processing", "MiniCPMV25Processor": "processing", "MiniCPMV26Processor": "processing",
    "load_processor": "processing",
    "load_tokenizer": "tokenizer",
    "ensure_tiny_v25": "tiny", "ensure_tiny_v26": "tiny",
}
VERSIONS = ("2.5", "2.6")

__all__ = [*_EXPORTS, "load", "checkpoint_version"]


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def checkpoint_version(folder: str | os.PathLike) -> str:
    """"2.5" or "2.6" for a MiniCPM-V 2.x checkpoint (a local folder or a hub id), from its config.json."""
    from .tokenizer import checkpoint_folder

    config = json.loads((checkpoint_folder(folder) / "config.json").read_text())
    if config.get("model_type") != "minicpmv":
        raise ValueError(f"{folder} is not a MiniCPM-V 2.x checkpoint (model_type {config.get('model_type')!r})")
    version = str(config.get("version", "2.5"))
    if version not in VERSIONS:
        raise ValueError(f"MiniCPM-V {version} is not supported natively (supported: {', '.join(VERSIONS)})")
    return version


def load(folder: str | os.PathLike, **from_pretrained_kwargs):
    """(model, processor) of a checkpoint (a local folder or a hub id); keyword arguments go to
    `from_pretrained` (`dtype`, `device_map`, `quantization_config`, `attn_implementation`, ...)."""
    version = checkpoint_version(folder)
    from .modeling import MiniCPMV25, MiniCPMV26
    from .processing import load_processor

    model_class = MiniCPMV25 if version == "2.5" else MiniCPMV26
    model = model_class.from_pretrained(str(folder), **from_pretrained_kwargs).eval()
    return model, load_processor(folder)
