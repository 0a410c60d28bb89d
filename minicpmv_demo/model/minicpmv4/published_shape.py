"""The shape of `openbmb/MiniCPM-V-4.6` as published (its config.json), for benchmarks offline.

`MiniCPMV4_6Config()` defaults describe a 9.11 B model that does not exist; the published
checkpoint is 1.30 B parameters (SigLIP2-400M vision + Qwen3.5-0.8B text): 2.6 GB in bf16. The
benchmarks build this shape with random weights: speed and memory depend on shapes, not on
what the weights say. One place, so every benchmark measures the same model.
"""

from __future__ import annotations

# From the published config.json (vision_config / text_config / top level).
VISION = {"num_hidden_layers": 27, "hidden_size": 1152, "intermediate_size": 4304, "num_attention_heads": 16,
          "patch_size": 14, "image_size": 980}
TEXT = {"num_hidden_layers": 24, "full_attention_interval": 4, "hidden_size": 1024, "intermediate_size": 3584,
        "num_attention_heads": 8, "num_key_value_heads": 2, "head_dim": 256, "linear_num_key_heads": 16,
        "linear_num_value_heads": 16, "linear_key_head_dim": 128, "linear_value_head_dim": 128,
        "linear_conv_kernel_dim": 4, "vocab_size": 248094, "max_position_embeddings": 262144}
TOP = {"image_size": 1120, "insert_layer_id": 6, "tie_word_embeddings": True}
# The published preprocessor_config.json.
PROCESSOR = {"scale_resolution": 448, "patch_size": 14, "max_slice_nums": 9}
# The published generation_config.json: what a user of the real checkpoint samples with.
TEMPERATURE = 0.7


def published_config(text_layers: int = 0, vision_layers: int = 0):
    """`MiniCPMV4_6Config` of the published checkpoint; `text_layers` / `vision_layers` (0 = as
    published) make a shallower copy that runs on a CPU, keeping the layer pattern and widths."""
    from transformers import MiniCPMV4_6Config

    text = dict(TEXT, model_type="qwen3_5_text")
    interval = text.pop("full_attention_interval")
    layers = text_layers or text["num_hidden_layers"]
    text["num_hidden_layers"] = layers
    text["layer_types"] = ["full_attention" if (i + 1) % interval == 0 else "linear_attention" for i in range(layers)]
    if "full_attention" not in text["layer_types"]:
        text["layer_types"][-1] = "full_attention"  # a shallow copy still has both cache kinds
    vision = dict(VISION, num_hidden_layers=vision_layers or VISION["num_hidden_layers"])
    top = dict(TOP, insert_layer_id=min(TOP["insert_layer_id"], vision["num_hidden_layers"] - 1))
    return MiniCPMV4_6Config(text_config=text, vision_config=vision, **top)


def random_published_runner(device: str, dtype, text_layers: int = 0, vision_layers: int = 0):
    """A `MiniCPMV4Runner` over the published shape with random weights, built in memory on `device`.

    The tokenizer is the tiny model's word vocabulary padded with made-up words to the full
    vocabulary (every id decodes to one word that encodes back to one token); the processor
    slices pictures as the published one does. Returns (runner, parameters, parameters one
    decoded token reads: the text layers and the head, not the vision tower nor the embeddings).
    """
    import torch
    from transformers import MiniCPMV4_6ForConditionalGeneration

    from .runner import MiniCPMV4Runner
    from .tiny import build_processor, build_word_tokenizer, multimodal_token_ids

    config = published_config(text_layers, vision_layers)
    tokenizer = build_word_tokenizer(config.text_config.vocab_size)
    config.text_config.eos_token_id, config.text_config.pad_token_id = tokenizer.eos_token_id, tokenizer.pad_token_id
    config.update(multimodal_token_ids(tokenizer))
    processor = build_processor(tokenizer, dict(PROCESSOR, patch_size=config.vision_config.patch_size))
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # made in its dtype directly: half the memory of fp32 for bf16
    try:
        with torch.device(device):
            model = MiniCPMV4_6ForConditionalGeneration(config).eval()
    finally:
        torch.set_default_dtype(previous)
    model.generation_config.eos_token_id = [tokenizer.eos_token_id]
    model.generation_config.pad_token_id = tokenizer.pad_token_id

    def count(module) -> int:
        return sum(p.numel() for p in module.parameters())

    read_per_token = count(model.get_decoder()) - count(model.get_input_embeddings()) \
        + count(model.get_output_embeddings())
    return MiniCPMV4Runner(model, processor), count(model), read_per_token
