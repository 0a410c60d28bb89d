"""The shape of `openbmb/MiniCPM-Llama3-V-2_5` and its `-int4` twin as published, for benchmarks offline.

8.54 B parameters: a Llama 3 8B text model, SigLIP-400M (Idefics2) vision, a resampler to 96
queries (the release's config.json, ../shared/notes/minicpmv-2_5.md). The `-int4` release keeps
the text model's layers in bitsandbytes nf4 with double quantization and float16 compute, and the
vision tower, resampler, embeddings and output head in float16. The benchmarks build this shape
with random weights, in memory (nothing is downloaded, nothing written): speed and memory depend
on shapes, not on what the weights say.
"""

from __future__ import annotations

import json

import torch

# From the release's config.json: the top level is the Llama 3 text model.
TEXT = {"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
        "num_key_value_heads": 8, "vocab_size": 128256, "max_position_embeddings": 8192, "rope_theta": 500000.0,
        "rms_norm_eps": 1e-05, "hidden_act": "silu", "attention_bias": False, "tie_word_embeddings": False}
VISION = {"hidden_size": 1152, "image_size": 980, "intermediate_size": 4304, "model_type": "idefics2",
          "num_attention_heads": 16, "num_hidden_layers": 27, "patch_size": 14}
TOP = {"version": "2.5", "query_num": 96, "image_size": 448, "patch_size": 14, "drop_vision_last_layer": False,
       "batch_vision_input": True, "slice_mode": True}
# The release's preprocessor_config.json (slices of 448 px, up to 9 per picture).
SLICES = {"max_slice_nums": 9, "scale_resolution": 448, "patch_size": 14}
# A toy copy for checking the benchmarks on a CPU: narrow and shallow, with the published
# vocabulary, queries and slicing (so prompts have the published lengths).
TOY_TEXT = {"hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 2, "num_attention_heads": 4,
            "num_key_value_heads": 2}
TOY_VISION = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 1, "num_attention_heads": 2}
# Llama 3's vocabulary ends with 256 special tokens (the release: ids 128000..128255); the tiny
# tokenizer names reserved ones up to 4, the padding continues from there.
SPECIAL_IDS = 256
RESERVED_FROM = 5
# The int4 release's compute dtype (its quantization_config's bnb_4bit_compute_dtype).
COMPUTE_DTYPE = torch.float16


def published_config(vocab_size: int, toy: bool = False):
    """`MiniCPMV25Config` of the release (`toy`: the narrow, shallow copy)."""
    from .config import MiniCPMV25Config

    text = dict(TEXT, vocab_size=vocab_size, **(TOY_TEXT if toy else {}))
    vision = dict(VISION, **(TOY_VISION if toy else {}))
    return MiniCPMV25Config(**text, **TOP, slice_config=dict(SLICES), vision_config=vision)


def padded_tokenizer(vocab_size: int):
    """The tiny 2.5 tokenizer (the release's special tokens, Llama 3's pre-tokenizer, decoder and
    begin-of-text) grown to the release's layout: made-up words fill the vocabulary up to the last
    256 ids, which hold the special tokens (the release's first 22 at 128000.., then reserved ones),
    so every id a random-weight model emits decodes (a special one to nothing, as in the release)."""
    from tokenizers import AddedToken, Tokenizer
    from transformers import TokenizersBackend

    from .tiny import V25_CHAT_TEMPLATE, V25_SPECIAL_TOKENS, build_v25_tokenizer

    state = json.loads(build_v25_tokenizer().backend_tokenizer.to_str())
    vocab = state["model"]["vocab"]
    if sorted(vocab.values()) != list(range(len(vocab))):
        raise ValueError("the tiny tokenizer's vocabulary is not numbered 0..n-1")
    first_special = vocab_size - SPECIAL_IDS
    # The special tokens follow the vocabulary (tokenizers numbers them after it).
    vocab.update({f"Ġw{index}": index for index in range(len(vocab), first_special)})
    backend = Tokenizer.from_str(json.dumps(state))
    reserved = vocab_size - backend.get_vocab_size(with_added_tokens=True)
    backend.add_special_tokens([AddedToken(f"<|reserved_special_token_{index}|>", special=True, normalized=False)
                                for index in range(RESERVED_FROM, RESERVED_FROM + reserved)])
    return TokenizersBackend(tokenizer_object=backend, bos_token=V25_SPECIAL_TOKENS[0], eos_token="<|end_of_text|>",
                             unk_token="<unk>", pad_token="!", chat_template=V25_CHAT_TEMPLATE)


def random_published_runner(device: str, int4: bool = True, toy: bool = False):
    """A `MiniCPMV2Runner` over the release's shape (`toy`: the narrow, shallow copy) with random
    weights, built on `device` in float16; with `int4`, the text layers' linear maps in nf4 (double
    quant, float16 compute) as the `-int4` release has them. Returns (runner, parameters, bytes one
    decoded token reads: the text layers and the output head, not the vision tower nor the
    embeddings)."""
    from .modeling import MiniCPMV25
    from .processing import MiniCPMV25Processor
    from .config import SliceSettings
    from .runner import MiniCPMV2Runner

    tokenizer = padded_tokenizer(TEXT["vocab_size"])
    config = published_config(len(tokenizer), toy)
    config.bos_token_id, config.eos_token_id = tokenizer.bos_token_id, tokenizer.eos_token_id
    previous = torch.get_default_dtype()
    torch.set_default_dtype(COMPUTE_DTYPE)  # made in float16 directly: half the memory of float32
    try:
        with torch.device(device):
            model = MiniCPMV25(config).eval()
    finally:
        torch.set_default_dtype(previous)
    model.to(device)  # the position table is made on the CPU whatever the default device
    parameters = sum(p.numel() for p in model.parameters())
    if int4:
        for layer in model.llm.model.layers:
            _quantize_linears(layer, device)
    read = [*model.llm.model.layers.parameters(), *model.llm.lm_head.parameters()]
    read_bytes = sum(p.numel() * p.element_size() for p in read)
    processor = MiniCPMV25Processor(tokenizer, SliceSettings(**SLICES), query_num=TOP["query_num"])
    return MiniCPMV2Runner(model, processor), parameters, read_bytes


def _quantize_linears(module: torch.nn.Module, device: str) -> None:
    """Every `nn.Linear` under `module` becomes a bitsandbytes nf4 layer (double quant, float16
    compute), quantized from its own weights on `device`, one at a time (the float16 copy goes)."""
    import bitsandbytes as bnb

    for name, child in list(module.named_children()):
        if not isinstance(child, torch.nn.Linear):
            _quantize_linears(child, device)
            continue
        layer = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                  compute_dtype=COMPUTE_DTYPE, compress_statistics=True, quant_type="nf4",
                                  device="meta")
        layer.weight = bnb.nn.Params4bit(child.weight.data, requires_grad=False, compress_statistics=True,
                                         quant_type="nf4", module=layer)
        if child.bias is not None:
            layer.bias = child.bias
        setattr(module, name, layer.to(device))
