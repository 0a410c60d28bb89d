"""The native MiniCPM-V 2.5 keeps the release's module tree: every weight name and shape.

The rules below are the table of /work/shared/notes/minicpmv-2_5.md (the release's state_dict,
741 tensors) written in terms of the config, so a renamed or reshaped module fails loudly, both at
the release's size (built on the meta device: no memory) and in the tiny checkpoint's file.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from minicpmv2_support import tiny_v25_dir, v25_cache  # noqa: F401 (fixtures)

# config.json of openbmb/MiniCPM-Llama3-V-2_5 (the keys that shape weights, and those a loader
# must put up with: auto_map, version as a string, rope_theta, torch_dtype).
RELEASE_CONFIG = {
    "version": "2.5", "architectures": ["MiniCPMV"], "model_type": "minicpmv",
    "auto_map": {"AutoConfig": "configuration_minicpm.MiniCPMVConfig", "AutoModel": "modeling_minicpmv.MiniCPMV",
                 "AutoModelForCausalLM": "modeling_minicpmv.MiniCPMV"},
    "attention_bias": False, "batch_vision_input": True, "bos_token_id": 128000, "drop_vision_last_layer": False,
    "eos_token_id": 128001, "hidden_act": "silu", "hidden_size": 4096, "image_size": 448,
    "intermediate_size": 14336, "max_position_embeddings": 8192, "mm_use_im_start_end": True,
    "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 8, "patch_size": 14,
    "query_num": 96, "rms_norm_eps": 1e-05, "rope_scaling": None, "rope_theta": 500000.0,
    "slice_config": {"max_slice_nums": 9, "patch_size": 14, "model_type": "minicpmv"}, "slice_mode": True,
    "tie_word_embeddings": False, "torch_dtype": "float16", "use_cache": False, "vocab_size": 128256,
    "vision_config": {"hidden_size": 1152, "image_size": 980, "intermediate_size": 4304, "model_type": "idefics2",
                      "num_attention_heads": 16, "num_hidden_layers": 27, "patch_size": 14},
}


def expected_weights(config) -> dict[str, tuple[int, ...]]:
    """The release's weight names and shapes for `config`."""
    hidden, inner, vocab = config.hidden_size, config.intermediate_size, config.vocab_size
    kv = config.num_key_value_heads * (hidden // config.num_attention_heads)
    vision = config.vision_config
    v_hidden, v_inner, patch = vision.hidden_size, vision.intermediate_size, vision.patch_size
    v_layers = vision.num_hidden_layers - (1 if config.drop_vision_last_layer else 0)
    names = {"llm.model.embed_tokens.weight": (vocab, hidden), "llm.model.norm.weight": (hidden,),
             "llm.lm_head.weight": (vocab, hidden)}
    for i in range(config.num_hidden_layers):
        prefix = f"llm.model.layers.{i}."
        names.update({
            prefix + "self_attn.q_proj.weight": (hidden, hidden), prefix + "self_attn.k_proj.weight": (kv, hidden),
            prefix + "self_attn.v_proj.weight": (kv, hidden), prefix + "self_attn.o_proj.weight": (hidden, hidden),
            prefix + "mlp.gate_proj.weight": (inner, hidden), prefix + "mlp.up_proj.weight": (inner, hidden),
            prefix + "mlp.down_proj.weight": (hidden, inner), prefix + "input_layernorm.weight": (hidden,),
            prefix + "post_attention_layernorm.weight": (hidden,),
        })
    names.update({
        "vpm.embeddings.patch_embedding.weight": (v_hidden, 3, patch, patch),
        "vpm.embeddings.patch_embedding.bias": (v_hidden,),
        "vpm.embeddings.position_embedding.weight": ((vision.image_size // patch) ** 2, v_hidden),
        "vpm.post_layernorm.weight": (v_hidden,), "vpm.post_layernorm.bias": (v_hidden,),
    })
    for i in range(v_layers):
        prefix = f"vpm.encoder.layers.{i}."
        for proj in ("k_proj", "v_proj", "q_proj", "out_proj"):
            names[f"{prefix}self_attn.{proj}.weight"] = (v_hidden, v_hidden)
            names[f"{prefix}self_attn.{proj}.bias"] = (v_hidden,)
        for norm in ("layer_norm1", "layer_norm2"):
            names[f"{prefix}{norm}.weight"] = names[f"{prefix}{norm}.bias"] = (v_hidden,)
        names.update({prefix + "mlp.fc1.weight": (v_inner, v_hidden), prefix + "mlp.fc1.bias": (v_inner,),
                      prefix + "mlp.fc2.weight": (v_hidden, v_inner), prefix + "mlp.fc2.bias": (v_hidden,)})
    names.update({
        "resampler.query": (config.query_num, hidden), "resampler.proj": (hidden, hidden),
        "resampler.kv_proj.weight": (hidden, v_hidden), "resampler.attn.in_proj_weight": (3 * hidden, hidden),
        "resampler.attn.in_proj_bias": (3 * hidden,), "resampler.attn.out_proj.weight": (hidden, hidden),
        "resampler.attn.out_proj.bias": (hidden,),
    })
    for norm in ("ln_q", "ln_kv", "ln_post"):
        names[f"resampler.{norm}.weight"] = names[f"resampler.{norm}.bias"] = (hidden,)
    return names


def state_shapes(model) -> dict[str, tuple[int, ...]]:
    return {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}


def test_release_size_model_has_the_releases_741_weights():
    from minicpmv_demo.model.minicpmv2 import MiniCPMV25, MiniCPMV25Config

    config = MiniCPMV25Config(**RELEASE_CONFIG)
    expected = expected_weights(config)
    assert len(expected) == 741
    with torch.device("meta"):
        model = MiniCPMV25(config)
    assert state_shapes(model) == expected  # the position table is a non-persistent buffer: not saved
    assert "resampler.pos_embed" not in model.state_dict() and model.resampler.pos_embed.shape == (70, 70, 4096)
    assert model.resampler.attn.num_heads == 32  # hidden // 128, as the release sets it


def test_dropping_the_last_vision_layer_drops_its_weights():
    from minicpmv_demo.model.minicpmv2 import MiniCPMV25, MiniCPMV25Config

    config = MiniCPMV25Config(**{**RELEASE_CONFIG, "drop_vision_last_layer": True})
    with torch.device("meta"):
        model = MiniCPMV25(config)
    assert len(model.vpm.encoder.layers) == 26
    assert state_shapes(model) == expected_weights(config)
    assert not any(name.startswith("vpm.encoder.layers.26.") for name in model.state_dict())


def test_tiny_checkpoint_file_holds_exactly_the_releases_names(tiny_v25_dir):
    from minicpmv_demo.model.minicpmv2 import MiniCPMV25Config

    config = MiniCPMV25Config.from_pretrained(tiny_v25_dir)
    with safe_open(tiny_v25_dir / "model.safetensors", "pt") as weights:
        stored = {name: tuple(weights.get_slice(name).get_shape()) for name in weights.keys()}
        dtypes = {weights.get_slice(name).get_dtype() for name in weights.keys()}
    assert stored == expected_weights(config)
    assert dtypes == {"F16"}  # saved in float16, as the release is


def test_tiny_config_has_the_releases_keys(tiny_v25_dir):
    written = json.loads((tiny_v25_dir / "config.json").read_text())
    assert set(written) >= set(RELEASE_CONFIG)
    assert written["model_type"] == "minicpmv" and written["version"] == "2.5"
    assert written["architectures"] == ["MiniCPMV"] and written["auto_map"] == RELEASE_CONFIG["auto_map"]
    assert written["vision_config"]["model_type"] == "idefics2"


@pytest.mark.parametrize("key", ["llm", "vpm", "resampler"])
def test_top_level_modules_are_the_releases(key):
    from minicpmv_demo.model.minicpmv2 import MiniCPMV25, MiniCPMV25Config

    with torch.device("meta"):
        model = MiniCPMV25(MiniCPMV25Config(**RELEASE_CONFIG))
    assert [name for name, _ in model.named_children()] == ["llm", "vpm", "resampler"]
    assert type(getattr(model, key)).__name__ == {"llm": "LlamaForCausalLM", "vpm": "Idefics2VisionTransformer",
                                                  "resampler": "Resampler"}[key]


def test_tiny_build_is_deterministic_and_small(tmp_path, tiny_v25_dir):
    from minicpmv_demo.model.minicpmv2.tiny import build_tiny_v25

    build_tiny_v25(tmp_path)
    for name in ("model.safetensors", "tokenizer.json", "config.json", "preprocessor_config.json"):
        assert (tmp_path / name).read_bytes() == (tiny_v25_dir / name).read_bytes(), name
    assert sum(path.stat().st_size for path in tiny_v25_dir.iterdir()) < 5 * 2**20
