"""The incremental decoder against a byte-level BPE tokenizer (the kind MiniCPM-V's Qwen text
models use), where one character can span several tokens and spaces belong to the next word."""

from __future__ import annotations

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from minicpmv_demo.engine.detokenizer import IncrementalDecoder

CORPUS = ["The quick brown fox jumps over the lazy dog.", "Café, naïve, résumé: déjà vu.",
          "数据 图表 收据", "emoji 🙂🚀 and symbols ±×÷"] * 20
TEXTS = ["The lazy fox, déjà vu 🙂!", "图表 shows 🚀🚀 growth ± 3%", "  leading spaces and\nnew lines  "]


@pytest.fixture(scope="module")
def byte_level_tokenizer() -> PreTrainedTokenizerFast:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.train_from_iterator(CORPUS, trainers.BpeTrainer(
        vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer)


def test_pieces_add_up_to_the_whole_text(byte_level_tokenizer):
    shared: dict[int, str] = {}  # one engine's decoders share the per-token texts
    for text in TEXTS:
        ids = byte_level_tokenizer(text, add_special_tokens=False)["input_ids"]
        decoder = IncrementalDecoder(byte_level_tokenizer, shared)
        pieces = [decoder.push(token) for token in ids]
        assert "".join(pieces) == byte_level_tokenizer.decode(ids) == text
        assert not any("\ufffd" in piece for piece in pieces), "half a character was shown"
    assert shared, "single-token texts are remembered for the next rows"
