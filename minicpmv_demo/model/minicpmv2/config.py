"""The configuration of MiniCPM-Llama3-V 2.5, read from the release's own config.json.

The release stores a Llama-3 configuration at the top level with a few extra keys (`version`,
`query_num`, `slice_config`, `vision_config`, `drop_vision_last_layer`, `batch_vision_input`, ...)
and an `auto_map` that points at its remote code. This class reads the same file with no remote
code: it is a `LlamaConfig` (so `LlamaForCausalLM` takes it as it is, as the release does) plus
those keys; `auto_map` is kept as data and never followed. Defaults are the ones of the release's
`configuration_minicpm.py: MiniCPMVConfig` for a key a config.json leaves out.
"""

from __future__ import annotations

from dataclasses import dataclass

from transformers import LlamaConfig
from transformers.configuration_utils import SubConfigSpec
from transformers.models.idefics2.configuration_idefics2 import Idefics2VisionConfig

# The release's default vision tower when config.json has none (SigLIP-400M, NaViT patching).
DEFAULT_VISION_CONFIG = {"hidden_size": 1152, "image_size": 980, "intermediate_size": 4304,
                         "num_attention_heads": 16, "num_hidden_layers": 27, "patch_size": 14}


@dataclass(frozen=True)
class SliceSettings:
    """How a picture is cut into slices: at most `max_slice_nums` slices (plus the whole picture),
    each about `scale_resolution` pixels square, sides in multiples of `patch_size`."""

    max_slice_nums: int = 9
    scale_resolution: int = 448
    patch_size: int = 14


class MiniCPMV25Config(LlamaConfig):
    """MiniCPM-Llama3-V 2.5: a Llama-3 text model, an Idefics2 (SigLIP NaViT) vision tower, and a
    resampler that turns each picture slice into `query_num` embeddings."""

    model_type = "minicpmv"
    sub_configs_defaults = {
        "vision_config": SubConfigSpec(config_class=Idefics2VisionConfig, init_kwargs=DEFAULT_VISION_CONFIG),
    }

    version: str | float = "2.5"
    query_num: int = 64
    image_size: int = 448
    patch_size: int = 14
    drop_vision_last_layer: bool = True
    batch_vision_input: bool = True
    slice_mode: bool = True
    slice_config: dict | None = None
    vision_config: dict | Idefics2VisionConfig | None = None

    @property
    def version_number(self) -> float:
        """`version` as a number: config.json writes "2.5" (a string) for 2.5 and 2.6 for 2.6."""
        return float(self.version)

    @property
    def slices(self) -> SliceSettings:
        """The slice settings config.json names (the processor's own file wins where present);
        the release's slice config defaults to one slice when config.json has none."""
        if self.slice_config is None:
            return SliceSettings(max_slice_nums=1)
        known = {key: self.slice_config[key] for key in ("max_slice_nums", "scale_resolution", "patch_size")
                 if key in self.slice_config}
        return SliceSettings(**known)
