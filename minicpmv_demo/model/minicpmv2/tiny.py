"""Tiny offline MiniCPM-V 2.5 and 2.6 checkpoints: the releases' files and names at toy size, random weights.

Like `model/minicpmv4/tiny.py` does for 4.6: built deterministically (fixed seed, fixed training text for
the tokenizer) into an ordinary checkpoint folder, then loaded by the same `from_pretrained` that
loads `openbmb/MiniCPM-Llama3-V-2_5`. Each folder has the release's files with the release's
shapes and keys: config.json (`model_type` "minicpmv", `version`, `architectures`, `auto_map`, ...),
generation_config.json, model.safetensors (float16, the release's weight names),
preprocessor_config.json, tokenizer.json (a byte-level BPE with Llama 3's pre-tokenizer,
post-processor and the release's special tokens in the release's order) and tokenizer_config.json.
The `-int4` folder is the same model quantized with bitsandbytes (nf4, double quant, float16
compute) on the CPU and saved pre-quantized, `quantization_config` in its config.json, as the
`-int4` release is; its vision tower, resampler and output head stay 16-bit (the project's
`loading.UNQUANTIZED_MODULES`).

Sizes: text 256 wide (2 resampler heads of 128, as the release's rule gives), 2 layers, 4 heads,
2 key/value heads; vision 64 wide, 2 layers; 8 queries per slice; slices of 112 px (8 x 8 patches),
up to 9 per picture: a 640 x 460 picture becomes the whole plus 9 slices. About 2.7 MB.

The 2.6 twins (`ensure_tiny_v26`) have 2.6's shapes of the same files: a Qwen2 text model (q/k/v
biases), bfloat16 weights, `use_image_id`, `vision_batch_size`, a Qwen2-style byte-level BPE (digits
split one by one, no begin-of-text) with ChatML's and MiniCPM-V 2.6's special tokens; the int4
twin computes in bfloat16.

The folders are caches: `ensure_tiny_v25` / `ensure_tiny_v26` build one the first time and reuse it.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

from ..built_checkpoints import default_cache_dir, ensure_built

# Bump when anything below changes what gets built: old cache folders are then ignored.
TINY_V25_VERSION = "v1"
TINY_V26_VERSION = "v1"
SEED = 1234

# Llama 3's pre-tokenizer pattern (the split before byte-level BPE), as its tokenizer.json has it.
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
# The 2.5 release's first special tokens, in its order (ids 128000..128021 there, after the BPE
# vocabulary here): Llama 3's, with reserved ones renamed for pictures and grounding.
V25_SPECIAL_TOKENS = [
    "<|begin_of_text|>", "<|end_of_text|>", "<unk>", "<|reserved_special_token_1|>", "<|reserved_special_token_2|>",
    "<|reserved_special_token_3|>", "<|start_header_id|>", "<|end_header_id|>", "<|reserved_special_token_4|>",
    "<|eot_id|>", "<image>", "</image>", "<ref>", "</ref>", "<box>", "</box>", "<quad>", "</quad>", "<point>",
    "</point>", "<slice>", "</slice>",
]
# What the tokenizer learns its merges from: enough English for questions to round-trip in few
# tokens; any other text still round-trips byte by byte.
TRAINING_TEXT = [
    "What is this? A café.", "What is in the picture? Describe the image in detail.",
    "The chart shows sales by month: the highest bar is in July, the lowest in January.",
    "A receipt from a coffee shop lists bread, milk, tea and a cake; the total is $12.50.",
    "A diagram with boxes and arrows: the user sends a request, the engine answers.",
    "A scene with mountains, trees, a river and a small house under a blue sky.",
    "Yes. No. Maybe! Thank you, see you again.\nFirst line\nSecond line\n\n- item one\n- item two",
    "How many people are there? There are two people near the window.",
    "Read the text in the image. What colour is the car? It is red, green and white.",
    "0 1 2 3 4 5 6 7 8 9 10 100 2024 3.14",
]
BPE_VOCAB_SIZE = 420

# The release's chat format as a template (tokenizer_config.json carries one, which the release's
# `chat()` renders); the project's own code builds prompts in processing.py instead.
V25_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first %}{{ bos_token }}{% endif %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    " + (message['content'] | trim) + '<|eot_id|>' }}"
    "{% endfor %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
)
# Where the release's own code lives (data here: nothing follows these without trust_remote_code).
V25_AUTO_MAP = {"AutoConfig": "configuration_minicpm.MiniCPMVConfig", "AutoModel": "modeling_minicpmv.MiniCPMV",
                "AutoModelForCausalLM": "modeling_minicpmv.MiniCPMV"}
V25_TOKENIZER_AUTO_MAP = {"AutoTokenizer": ["tokenization_minicpmv_fast.MiniCPMVTokenizerFast", None]}
V25_PROCESSOR_AUTO_MAP = {"AutoProcessor": "processing_minicpmv.MiniCPMVProcessor",
                          "AutoImageProcessor": "image_processing_minicpmv.MiniCPMVImageProcessor"}

TINY_TEXT = {"hidden_size": 256, "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4,
             "num_key_value_heads": 2}
TINY_VISION = {"hidden_size": 64, "image_size": 140, "intermediate_size": 128, "model_type": "idefics2",
               "num_attention_heads": 2, "num_hidden_layers": 2, "patch_size": 14}
TINY_SLICES = {"max_slice_nums": 9, "scale_resolution": 112, "patch_size": 14}
TINY_QUERY_NUM = 8
# Bigger than the release's 0.02, so that pictures visibly move a random model's answers.
TINY_INIT_STD = 0.1
# Kept in 16 bits by the int4 build, as `loading.UNQUANTIZED_MODULES` keeps them.
INT4_SKIP_MODULES = ["vpm", "resampler", "lm_head"]


def ensure_tiny_v25(cache_dir: str | os.PathLike | None = None, quantized: bool = False) -> Path:
    """The tiny 2.5 checkpoint folder (`quantized`: its int4 twin), built first if not cached."""
    return _ensure("tiny-minicpmv2_5", TINY_V25_VERSION, cache_dir, quantized, build_tiny_v25, build_tiny_v25_int4)


def _ensure(stem: str, version: str, cache_dir: str | os.PathLike | None, quantized: bool,
            build: Callable[[Path], None], build_int4: Callable[[Path, Path], None]) -> Path:
    """The cached folder `<stem>[-int4]-<version>`, built first if missing; the int4 twin is
    quantized from the 16-bit folder, itself built first if missing."""
    root = Path(cache_dir) if cache_dir else default_cache_dir()
    source = ensure_built(root / f"{stem}-{version}", build)
    if not quantized:
        return source
    return ensure_built(root / f"{stem}-int4-{version}", lambda folder: build_int4(source, folder))


def build_tiny_v25(folder: str | os.PathLike) -> None:
    """Write the tiny 2.5 checkpoint (float16 weights, like the release) into `folder`."""
    import torch

    from .config import MiniCPMV25Config
    from .modeling import MiniCPMV25

    folder = Path(folder)
    tokenizer = build_v25_tokenizer()
    _save_random_weights(folder, MiniCPMV25Config, MiniCPMV25, v25_config_dict(tokenizer), torch.float16)
    _write_json(folder / "generation_config.json", {"_from_model_config": True, "bos_token_id": tokenizer.bos_token_id,
                                                    "eos_token_id": tokenizer.eos_token_id})
    save_v25_tokenizer(tokenizer, folder)
    _write_json(folder / "preprocessor_config.json", v25_preprocessor_dict())


def _save_random_weights(folder: Path, config_class, model_class, config_dict: dict, dtype) -> None:
    """Seeded random weights of `config_dict`'s shapes saved in `dtype`, and config.json as the
    release writes it (without the tiny model's larger initializer range)."""
    import torch

    config = config_class(**{**config_dict, "initializer_range": TINY_INIT_STD})
    with torch.random.fork_rng():
        torch.manual_seed(SEED)
        model = model_class(config)
    model.to(dtype).save_pretrained(folder)
    _write_json(folder / "config.json", config_dict)


def build_tiny_v25_int4(source: str | os.PathLike, folder: str | os.PathLike) -> None:
    """Quantize the tiny 2.5 in `source` (nf4, double quant, float16 compute, as the 2.5 int4
    release) on the CPU and save it pre-quantized into `folder`, with the source's other files."""
    import torch

    from .modeling import MiniCPMV25

    _quantize(MiniCPMV25, source, folder, torch.float16)


def _quantize(model_class, source: str | os.PathLike, folder: str | os.PathLike, compute_dtype) -> None:
    from transformers import BitsAndBytesConfig

    source, folder = Path(source), Path(folder)
    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                      bnb_4bit_compute_dtype=compute_dtype, llm_int8_skip_modules=INT4_SKIP_MODULES)
    model = model_class.from_pretrained(source, dtype=compute_dtype, device_map="cpu", quantization_config=quantization)
    model.save_pretrained(folder)
    saved = json.loads((folder / "config.json").read_text())
    config = json.loads((source / "config.json").read_text())
    config["quantization_config"] = saved["quantization_config"]
    _write_json(folder / "config.json", config)
    for name in ("generation_config.json", "preprocessor_config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(source / name, folder / name)


def v25_config_dict(tokenizer) -> dict:
    """config.json of the tiny 2.5: the release's keys, toy sizes."""
    return {
        "_name_or_path": "tiny-minicpmv2_5",
        "version": "2.5",
        "architectures": ["MiniCPMV"],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "auto_map": V25_AUTO_MAP,
        "batch_vision_input": True,
        "bos_token_id": tokenizer.bos_token_id,
        "drop_vision_last_layer": False,
        "eos_token_id": tokenizer.eos_token_id,
        "hidden_act": "silu",
        **TINY_TEXT,
        "image_size": 448,
        "initializer_range": 0.02,
        "max_position_embeddings": 8192,
        "mm_use_im_start_end": True,
        "model_type": "minicpmv",
        "patch_size": 14,
        "pretraining_tp": 1,
        "query_num": TINY_QUERY_NUM,
        "rms_norm_eps": 1e-05,
        "rope_scaling": None,
        "rope_theta": 500000.0,
        "slice_config": {**TINY_SLICES, "model_type": "minicpmv"},
        "slice_mode": True,
        "tie_word_embeddings": False,
        "torch_dtype": "float16",
        "use_cache": False,
        "vision_config": TINY_VISION,
        "vocab_size": len(tokenizer),
    }


def v25_preprocessor_dict() -> dict:
    """preprocessor_config.json of the tiny 2.5: the release's keys, toy sizes."""
    return {
        "image_processor_type": "MiniCPMVImageProcessor",
        "auto_map": V25_PROCESSOR_AUTO_MAP,
        "processor_class": "MiniCPMVProcessor",
        **TINY_SLICES,
        "image_feature_size": TINY_QUERY_NUM,
        "im_start": "<image>",
        "im_end": "</image>",
        "slice_start": "<slice>",
        "slice_end": "</slice>",
        "unk": "<unk>",
        "norm_mean": [0.5, 0.5, 0.5],
        "norm_std": [0.5, 0.5, 0.5],
        "version": 2.5,
    }


def build_v25_tokenizer():
    """A byte-level BPE shaped like the 2.5 release's: Llama 3's split pattern, byte-level
    alphabet ("!" is id 0, the release's pad token), merges learnt from TRAINING_TEXT, then the
    release's special tokens, and the post-processor that puts `<|begin_of_text|>` in front."""
    from tokenizers import AddedToken, processors
    from transformers import TokenizersBackend

    backend = _byte_level_bpe(LLAMA3_SPLIT, ignore_merges=True)
    backend.add_special_tokens([AddedToken(token, special=True, normalized=False) for token in V25_SPECIAL_TOKENS])
    begin = V25_SPECIAL_TOKENS[0]
    backend.post_processor = processors.Sequence([
        processors.ByteLevel(add_prefix_space=True, trim_offsets=False, use_regex=True),
        processors.TemplateProcessing(single=f"{begin} $A", pair=f"{begin} $A {begin}:1 $B:1",
                                      special_tokens=[(begin, backend.token_to_id(begin))]),
    ])
    return TokenizersBackend(tokenizer_object=backend, bos_token=begin, eos_token="<|end_of_text|>",
                             unk_token="<unk>", pad_token="!", chat_template=V25_CHAT_TEMPLATE)


def build_v26_tokenizer():
    """A byte-level BPE shaped like Qwen2's (2.6's text model): NFC, Qwen2's split pattern (digits
    one by one), no begin-of-text, then ChatML's and MiniCPM-V 2.6's special tokens."""
    from tokenizers import AddedToken, normalizers, processors
    from transformers import TokenizersBackend

    backend = _byte_level_bpe(QWEN2_SPLIT, ignore_merges=False)
    backend.normalizer = normalizers.NFC()
    backend.add_special_tokens([AddedToken(token, special=True, normalized=False) for token in V26_SPECIAL_TOKENS])
    backend.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    return TokenizersBackend(tokenizer_object=backend, bos_token="<|im_start|>", eos_token="<|im_end|>",
                             unk_token="<unk>", pad_token="<|endoftext|>", chat_template=V26_CHAT_TEMPLATE)


def _byte_level_bpe(split_pattern: str, ignore_merges: bool):
    """A byte-level BPE trained on TRAINING_TEXT with `split_pattern` as its pre-tokenizer."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    backend = Tokenizer(models.BPE(ignore_merges=ignore_merges))
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(split_pattern), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False),
    ])
    backend.decoder = decoders.ByteLevel(add_prefix_space=True, trim_offsets=True, use_regex=True)
    trainer = trainers.BpeTrainer(vocab_size=BPE_VOCAB_SIZE, min_frequency=2, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(TRAINING_TEXT, trainer)
    return backend


def save_v25_tokenizer(tokenizer, folder: Path) -> None:
    """tokenizer.json and a tokenizer_config.json with the release's keys (its class name and
    `auto_map` included: the project never follows them)."""
    _save_tokenizer(tokenizer, folder, V25_CHAT_TEMPLATE, {"clean_up_tokenization_spaces": True,
                                                          "padding_side": "right", "truncation_side": "right"})


def _save_tokenizer(tokenizer, folder: Path, template: str, extra: dict) -> None:
    tokenizer.save_pretrained(folder)
    for name in ("special_tokens_map.json", "chat_template.jinja"):
        (folder / name).unlink(missing_ok=True)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config.pop("backend", None)
    config.update({"auto_map": V25_TOKENIZER_AUTO_MAP, "chat_template": template,
                   "model_input_names": ["input_ids", "attention_mask"], "tokenizer_class": "MiniCPMVTokenizerFast",
                   **extra})
    _write_json(folder / "tokenizer_config.json", config)


# -- 2.6 ----------------------------------------------------------------------------------------
# Qwen2's pre-tokenizer pattern: as Llama 3's but digits one at a time.
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")
# ChatML's tokens, then MiniCPM-V 2.6's (their names; this order is the tiny model's own).
V26_SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>", "</image>", "<ref>", "</ref>", "<box>", "</box>",
    "<quad>", "</quad>", "<point>", "</point>", "<slice>", "</slice>", "<image_id>", "</image_id>", "<unk>",
]
# Qwen2's ChatML with its default system message (the template 2.6's `chat()` renders).
V26_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
TINY_V26_VISION = {**TINY_VISION, "model_type": "siglip"}


def ensure_tiny_v26(cache_dir: str | os.PathLike | None = None, quantized: bool = False) -> Path:
    """The tiny 2.6 checkpoint folder (`quantized`: its int4 twin), built first if not cached."""
    return _ensure("tiny-minicpmv2_6", TINY_V26_VERSION, cache_dir, quantized, build_tiny_v26, build_tiny_v26_int4)


def build_tiny_v26(folder: str | os.PathLike) -> None:
    """Write the tiny 2.6 checkpoint (bfloat16 weights, like the release) into `folder`."""
    import torch

    from .config import MiniCPMV26Config
    from .modeling import MiniCPMV26

    folder = Path(folder)
    tokenizer = build_v26_tokenizer()
    _save_random_weights(folder, MiniCPMV26Config, MiniCPMV26, v26_config_dict(tokenizer), torch.bfloat16)
    _write_json(folder / "generation_config.json", {"bos_token_id": tokenizer.convert_tokens_to_ids("<|endoftext|>"),
                                                    "eos_token_id": tokenizer.eos_token_id})
    _save_tokenizer(tokenizer, folder, V26_CHAT_TEMPLATE, {"clean_up_tokenization_spaces": False,
                                                          "padding_side": "right"})
    _write_json(folder / "preprocessor_config.json", v26_preprocessor_dict())


def build_tiny_v26_int4(source: str | os.PathLike, folder: str | os.PathLike) -> None:
    """Quantize the tiny 2.6 in `source` (nf4, double quant, bfloat16 compute) on the CPU and save
    it pre-quantized into `folder`, with the source's other files."""
    import torch

    from .modeling import MiniCPMV26

    _quantize(MiniCPMV26, source, folder, torch.bfloat16)


def v26_config_dict(tokenizer) -> dict:
    """config.json of the tiny 2.6: the release's keys, toy sizes."""
    return {
        "_name_or_path": "tiny-minicpmv2_6",
        "version": 2.6,
        "architectures": ["MiniCPMV"],
        "attention_dropout": 0.0,
        "auto_map": V25_AUTO_MAP,
        "batch_vision_input": True,
        "bos_token_id": tokenizer.convert_tokens_to_ids("<|endoftext|>"),
        "drop_vision_last_layer": False,
        "eos_token_id": tokenizer.eos_token_id,
        "hidden_act": "silu",
        **TINY_TEXT,
        "image_size": 448,
        "initializer_range": 0.02,
        "max_position_embeddings": 32768,
        "max_window_layers": 28,
        "model_type": "minicpmv",
        "patch_size": 14,
        "query_num": TINY_QUERY_NUM,
        "rms_norm_eps": 1e-06,
        "rope_theta": 1000000.0,
        "slice_config": {**TINY_SLICES, "model_type": "minicpmv"},
        "slice_mode": True,
        "sliding_window": 131072,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "use_cache": True,
        "use_image_id": True,
        "use_sliding_window": False,
        "vision_batch_size": 16,
        "vision_config": TINY_V26_VISION,
        "vocab_size": len(tokenizer),
    }


def v26_preprocessor_dict() -> dict:
    """preprocessor_config.json of the tiny 2.6: the release's keys, toy sizes."""
    return {
        **v25_preprocessor_dict(),
        "use_image_id": True,
        "im_id_start": "<image_id>",
        "im_id_end": "</image_id>",
        "slice_mode": True,
        "version": 2.6,
    }


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
