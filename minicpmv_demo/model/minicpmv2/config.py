"""The configurations of MiniCPM-V 2.5 and 2.6, read from the releases' own config.json.

Each release stores its text model's configuration at the top level (Llama 3 for 2.5, Qwen2 for
2.6) with a few extra keys (`version`, `query_num`, `slice_config`, `vision_config`,
`drop_vision_last_layer`, `batch_vision_input`, 2.6's `use_image_id` and `vision_batch_size`)
and an `auto_map` that points at its remote code. These classes read the same files with no
remote code: each is the text model's config class (so `LlamaForCausalLM` / `Qwen2ForCausalLM`
take it as it is, as the releases do) plus those keys; `auto_map` is kept as data and never
followed. Defaults are those of the releases' `configuration_minicpm.py: MiniCPMVConfig` for a
key a config.json leaves out.
"""

from __future__ import annotations

from dataclasses import dataclass

from transformers import LlamaConfig, Qwen2Config
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


class MiniCPMVConfigMixin:
    """What the 2.x configurations add on top of their text model's fields."""

    @property
    def version_number(self) -> float:
        """`version` as a number: 2.5's config.json writes "2.5" (a string), 2.6's writes 2.6."""
        return float(self.version)

    @property
    def slices(self) -> SliceSettings:
        """The slice settings config.json names (the processor's own file wins where present);
        the releases' slice config defaults to one slice when config.json has none."""
        if self.slice_config is None:
            return SliceSettings(max_slice_nums=1)
        known = {key: self.slice_config[key] for key in ("max_slice_nums", "scale_resolution", "patch_size")
                 if key in self.slice_config}
        return SliceSettings(**known)


class MiniCPMV25Config(MiniCPMVConfigMixin, LlamaConfig):
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


class MiniCPMV26Config(MiniCPMVConfigMixin, Qwen2Config):
    """MiniCPM-V 2.6: a Qwen2 text model, the same SigLIP tower read with 2-D NaViT positions,
    the same resampler; pictures numbered in the prompt (`use_image_id`)."""

    model_type = "minicpmv"
    sub_configs_defaults = {
        "vision_config": SubConfigSpec(config_class=Idefics2VisionConfig, init_kwargs=DEFAULT_VISION_CONFIG),
    }

    version: str | float = 2.6
    query_num: int = 64
    image_size: int = 448
    patch_size: int = 14
    drop_vision_last_layer: bool = True
    batch_vision_input: bool = True
    slice_mode: bool = True
    slice_config: dict | None = None
    vision_config: dict | Idefics2VisionConfig | None = None
    use_image_id: bool = True
    vision_batch_size: int = 16
