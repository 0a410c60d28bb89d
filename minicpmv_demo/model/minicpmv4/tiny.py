"""The built-in tiny model: real MiniCPM-V 4.6 architecture at toy size, random weights.

It lets the demo run, and the tests drive the real model code path, on a CPU with no network.
It is built deterministically (fixed seed, fixed vocabulary) into an ordinary checkpoint folder,
which is then loaded by the very same `from_pretrained` calls that load `openbmb/MiniCPM-V-4.6`.
Its vocabulary is plain English words, so its random answers stream as readable (if meaningless)
words instead of broken UTF-8.
"""

from __future__ import annotations

import itertools
import os
import string
from pathlib import Path
from typing import TYPE_CHECKING

from ..built_checkpoints import default_cache_dir, ensure_built

if TYPE_CHECKING:  # transformers is imported lazily: `app.py --help` stays fast
    from transformers import MiniCPMV4_6Processor, TokenizersBackend

# Bump when anything below changes what gets built: old cache folders are then ignored.
TINY_MODEL_VERSION = "v6"
SEED = 1234

SPECIAL_TOKENS = {
    "pad_token": "<|endoftext|>",
    "eos_token": "<|im_end|>",
    "unk_token": "<unk>",
}
# Same strings as the real MiniCPM-V 4.6 tokenizer; the processor reads them by these names.
MULTIMODAL_TOKENS = {
    "image_token": "<|image_pad|>",
    "video_token": "<|video_pad|>",
    "image_start_token": "<image>",
    "image_end_token": "</image>",
    "slice_start_token": "<slice>",
    "slice_end_token": "</slice>",
    "image_id_start_token": "<image_id>",
    "image_id_end_token": "</image_id>",
}
CHAT_TOKENS = ["<|im_start|>"]
# Reasoning tags, as in Qwen3.5 (and so MiniCPM-V 4.6): ordinary added tokens, not special ones,
# so decoding with `skip_special_tokens=True` keeps them in the text where the parser finds them.
THINK_TOKENS = ["<think>", "</think>"]

WORDS = """
the a an and or but of to in on at by for with from as is are was were be been it this that these
those there here what which who how why when where yes no not all some many few more most less one
two three four five six seven eight nine ten image picture photo chart receipt diagram scene graph
table text number numbers total price item items store shop bar bars line lines axis month months
sales year left right top bottom middle center background foreground color colors red green blue
yellow orange purple black white gray brown pink sky sun cloud clouds mountain mountains tree trees
house road river water grass field flower person people car window door roof wall light dark bright
small large big tall short wide narrow round square box boxes arrow arrows step steps flow queue
engine stream user users model request requests answer question shows show see looks like appears
contains has have about around above below next near far inside outside value values highest
lowest increase decrease trend data label labels title shape shapes circle triangle rectangle simple
clear blurry busy quiet calm warm cold morning evening night day summer winter spring autumn paper
coffee bread milk apple tea sandwich cake water juice cash card change thank you visit again date
time list first second third last also then so very quite rather mostly mainly likely probably maybe
user assistant system
""".split()
PUNCTUATION = list(".,:;!?'\"()-/%$#&*+=<>[]{}")
DIGITS = list("0123456789")

# ChatML with Qwen3.5's reasoning switch, as MiniCPM-V 4.6 uses. An image part renders as one
# placeholder that the processor expands into the image's slices, a video part as one that it
# expands into the video's frames. Like Qwen3.5's template:
# - the generation prompt opens `<think>\n` (the reply starts as reasoning) unless
#   `enable_thinking` is false, which renders an empty, closed block `<think>\n\n</think>\n\n`;
# - an earlier assistant turn is rendered without its reasoning (what precedes its last
#   `</think>`): reasoning is never sent back to the model.
CHAT_TEMPLATE = (
    "{%- macro render(content) %}"
    "{%- if content is string %}{{- content }}"
    "{%- else %}{%- for part in content %}"
    "{%- if part['type'] == 'image' %}{{- '<|image_pad|>\\n' }}"
    "{%- elif part['type'] == 'video' %}{{- '<|video_pad|>\\n' }}"
    "{%- elif part['type'] == 'text' %}{{- part['text'] }}{%- endif %}"
    "{%- endfor %}{%- endif %}"
    "{%- endmacro %}"
    "{%- for message in messages %}"
    "{%- set content = render(message['content']) %}"
    "{%- if message['role'] == 'assistant' and '</think>' in content %}"
    "{%- set content = content.split('</think>')[-1].lstrip('\\n') %}"
    "{%- endif %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + content + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}"
    "{{- '<think>\\n\\n</think>\\n\\n' }}"
    "{%- else %}{{- '<think>\\n' }}{%- endif %}"
    "{%- endif %}"
)


def ensure_tiny_model(cache_dir: str | os.PathLike | None = None) -> Path:
    """Return the tiny checkpoint folder, building it first if this version is not there yet."""
    root = Path(cache_dir) if cache_dir else default_cache_dir()
    return ensure_built(root / f"tiny-minicpmv4_6-{TINY_MODEL_VERSION}", build_tiny_model)


def build_tiny_model(folder: Path) -> None:
    """Write tokenizer, processor and random-weight model into `folder`."""
    import torch
    from transformers import MiniCPMV4_6ForConditionalGeneration

    tokenizer = build_word_tokenizer()
    processor = build_processor(tokenizer)
    config = _build_config(tokenizer)
    with torch.random.fork_rng():
        torch.manual_seed(SEED)
        model = MiniCPMV4_6ForConditionalGeneration(config)
    save_checkpoint(model, processor, folder)


def multimodal_token_ids(tokenizer: TokenizersBackend) -> dict[str, int]:
    """The config's image and video placeholder ids, as the word tokenizer numbers them."""
    return {"image_token_id": tokenizer.convert_tokens_to_ids(MULTIMODAL_TOKENS["image_token"]),
            "video_token_id": tokenizer.convert_tokens_to_ids(MULTIMODAL_TOKENS["video_token"])}


# MiniCPM-V 4.6's generation_config.json sampling settings, so the defaults path runs in tests.
GENERATION_SAMPLING = {"do_sample": True, "temperature": 0.7, "top_p": 1.0, "top_k": 0}


def save_checkpoint(model, processor: MiniCPMV4_6Processor, folder: Path) -> None:
    """Save a random-weight model and its processor as an ordinary checkpoint folder; the
    generation config stops on the tokenizer's EOS, as the engine and `generate` expect, and
    samples as MiniCPM-V 4.6's does."""
    tokenizer = processor.tokenizer
    model.generation_config.eos_token_id = [tokenizer.eos_token_id]
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    for name, value in GENERATION_SAMPLING.items():
        setattr(model.generation_config, name, value)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)


def build_word_tokenizer(vocab_size: int = 0) -> TokenizersBackend:
    """A word-level tokenizer: random weights then pick whole words, which read as words.

    `vocab_size` pads the vocabulary with made-up letter-only words ("qaaaa", "qaaab", ...) up
    to a full model's size, so every id such a model emits decodes to one word, and that word
    encodes back to one token (benchmarks count tokens that way).
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import TokenizersBackend

    specials = list(SPECIAL_TOKENS.values()) + list(MULTIMODAL_TOKENS.values()) + CHAT_TOKENS + THINK_TOKENS
    ordinary = list(dict.fromkeys(WORDS + PUNCTUATION + DIGITS))
    ordinary += _filler_words(vocab_size - len(specials) - len(ordinary), taken=set(ordinary))
    vocab = {token: index for index, token in enumerate(specials + ordinary)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=SPECIAL_TOKENS["unk_token"]))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Whitespace(), pre_tokenizers.Digits(individual_digits=True)])
    backend.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    tokenizer = TokenizersBackend(
        tokenizer_object=backend,
        **SPECIAL_TOKENS,
        extra_special_tokens={**MULTIMODAL_TOKENS, "im_start_token": "<|im_start|>"},
        chat_template=CHAT_TEMPLATE,
        padding_side="left",
    )
    # Matched whole in any text (the pre-tokenizer would split "<think>" into "<", "think", ">"),
    # with the ids they already have in the vocabulary.
    tokenizer.add_tokens([AddedToken(tag, special=False, normalized=False) for tag in THINK_TOKENS])
    return tokenizer


def _filler_words(count: int, taken: set[str]) -> list[str]:
    """`count` made-up words "qaaaa", "qaaab", ...: letters only, so each stays one token, and
    none of them a word already in `taken`."""
    length = 1
    while 26**length < count + len(taken):
        length += 1
    words = ("q" + "".join(letters) for letters in itertools.product(string.ascii_lowercase, repeat=length))
    return list(itertools.islice((w for w in words if w not in taken), max(count, 0)))


def build_processor(tokenizer: TokenizersBackend,
                    sizes: dict[str, int] | None = None) -> MiniCPMV4_6Processor:
    """The MiniCPM-V 4.6 processor around `tokenizer`; `sizes` are the image processor's
    (the tiny model's small slices by default)."""
    from transformers import (MiniCPMV4_6ImageProcessor, MiniCPMV4_6Processor,
                              MiniCPMV4_6VideoProcessor)

    sizes = sizes or {"scale_resolution": 112, "patch_size": 14, "max_slice_nums": 4}
    return MiniCPMV4_6Processor(
        image_processor=MiniCPMV4_6ImageProcessor(**sizes),
        video_processor=MiniCPMV4_6VideoProcessor(**sizes),
        tokenizer=tokenizer,
        chat_template=CHAT_TEMPLATE,
    )


def _build_config(tokenizer):
    from transformers import MiniCPMV4_6Config

    text_config = {
        "model_type": "qwen3_5_text",
        "vocab_size": len(tokenizer),
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        # One layer of each kind, so the engine's cache handling is exercised on both.
        "layer_types": ["linear_attention", "full_attention"],
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 32,
        "rope_parameters": {"rope_type": "default", "rope_theta": 1e4, "mrope_section": [2, 1, 1]},
        "linear_conv_kernel_dim": 2,
        "linear_key_head_dim": 16,
        "linear_value_head_dim": 8,
        "linear_num_key_heads": 2,
        # 32 value heads: the a/b gate projections (one output per head) stay 32 wide, which
        # bitsandbytes' CPU int4 kernels need.
        "linear_num_value_heads": 32,
        "max_position_embeddings": 4096,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    # --quant leaves the vision tower unquantized (loading.UNQUANTIZED_MODULES), so its widths
    # need not suit bitsandbytes' kernels; the tests also load one whose MLP is 100 wide.
    vision_config = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                     "num_attention_heads": 2, "patch_size": 14, "image_size": 112}
    return MiniCPMV4_6Config(
        text_config=text_config,
        vision_config=vision_config,
        insert_layer_id=0,
        image_size=112,
        **multimodal_token_ids(tokenizer),
    )
