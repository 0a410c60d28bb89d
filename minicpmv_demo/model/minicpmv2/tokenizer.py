"""The tokenizer of MiniCPM-V 2.5 / 2.6, read with transformers' generic fast tokenizer.

The releases name their own tokenizer class (`tokenization_minicpmv_fast.py: MiniCPMVTokenizerFast`)
in tokenizer_config.json. That class only adds a few names on top of `PreTrainedTokenizerFast`, and
under transformers 5 a class with its own `__init__` is rebuilt from vocabulary and merges instead
of being read from tokenizer.json, which breaks 2.5's byte-level BPE ("What is this? A café" then
encodes character by character and decodes as "Ġis Ġthis ... fÃ©"). So this reads tokenizer.json
with `TokenizersBackend` itself, which keeps the file's pipeline as it is (pre-tokenizer, decoder,
and the post-processor that puts `<|begin_of_text|>` in front of an encoded text), and looks the
special tokens up by name.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import TokenizersBackend

# Picture placeholders, the same strings in 2.5 and 2.6.
IMAGE_START = "<image>"
IMAGE_END = "</image>"
SLICE_START = "<slice>"
SLICE_END = "</slice>"
IMAGE_PAD = "<unk>"  # each of a slice's query_num embeddings takes the place of one of these
IMAGE_ID_START = "<image_id>"  # 2.6 numbers a prompt's pictures: <image_id>0</image_id>
IMAGE_ID_END = "</image_id>"


# The small files a processor reads (never the weights).
PROCESSOR_FILES = ["config.json", "preprocessor_config.json", "tokenizer.json", "tokenizer_config.json",
                   "special_tokens_map.json", "generation_config.json"]


def checkpoint_folder(name_or_path: str | os.PathLike) -> Path:
    """A local checkpoint folder as it is; a hub id (e.g. "openbmb/MiniCPM-Llama3-V-2_5") as its
    cached snapshot of the processor's files (downloaded if missing and the hub is reachable)."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    if str(name_or_path).startswith((".", "/", "~")):
        raise FileNotFoundError(f"no checkpoint folder at {name_or_path}")
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(str(name_or_path), allow_patterns=PROCESSOR_FILES))


def load_tokenizer(folder: str | os.PathLike) -> TokenizersBackend:
    """The checkpoint's tokenizer (tokenizer.json + tokenizer_config.json), never its remote class."""
    from transformers import TokenizersBackend

    # The release's config asks for BPE-destroying space clean-up on decode, which transformers 5
    # refuses anyway (with a warning); say no up front.
    return TokenizersBackend.from_pretrained(str(folder), clean_up_tokenization_spaces=False)


@dataclass(frozen=True)
class PlaceholderIds:
    """Ids of the tokens that mark pictures in a prompt."""

    image_start: int
    image_end: int
    slice_start: int
    slice_end: int
    image_pad: int

    @classmethod
    def of(cls, tokenizer) -> PlaceholderIds:
        tokens = (IMAGE_START, IMAGE_END, SLICE_START, SLICE_END, IMAGE_PAD)
        return cls(*(token_id(tokenizer, token) for token in tokens))


def token_id(tokenizer, token: str) -> int:
    """The id of a token that must be in the vocabulary as one piece."""
    ids = tokenizer.convert_tokens_to_ids([token])
    if not ids or ids[0] is None or ids[0] == tokenizer.unk_token_id and token != tokenizer.unk_token:
        raise ValueError(f"the tokenizer has no {token!r} token: not a MiniCPM-V 2.5 / 2.6 tokenizer")
    return int(ids[0])
