"""Model loading: the tiny model in full precision and int4, clear errors (MiniCPM-V 2.x: test_minicpmv2_runner.py)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import GenerationConfig

from conftest import ask
from minicpmv_demo.web.chat_service import DEFAULT_TOP_P, ChatService
from minicpmv_demo.engine import SamplingParams
from minicpmv_demo.system.gpu import GpuMemory
from minicpmv_demo.model import ModelLoadError, load_model
from minicpmv_demo.model.sampling_defaults import checkpoint_sampling
from minicpmv_demo.model.minicpmv4.tiny import GENERATION_SAMPLING, build_word_tokenizer, ensure_tiny_model, save_checkpoint
from minicpmv_demo.config.settings import Settings

ROOT = Path(__file__).resolve().parents[2]


def test_tiny_model_is_the_real_architecture_and_deterministic(loaded_tiny, tmp_path):
    model = loaded_tiny.runner.model
    assert type(model).__name__ == "MiniCPMV4_6ForConditionalGeneration"
    assert type(loaded_tiny.runner.processor).__name__ == "MiniCPMV4_6Processor"
    batch, _ = loaded_tiny.runner.prefill([loaded_tiny.runner.encode(ask("Hi", "scene.png"))], [[]])
    kinds = {type(layer).__name__ for layer in batch.cache.layers}
    assert kinds == {"LinearAttentionLayer", "DynamicLayer"}, "both cache kinds must be exercised"
    other = ensure_tiny_model(tmp_path)
    first = (Path(loaded_tiny.runner.model.name_or_path) / "model.safetensors").read_bytes()
    assert (other / "model.safetensors").read_bytes() == first, "same seed, same weights everywhere"


def test_tiny_model_answers_with_readable_words(make_engine):
    reply = make_engine(max_batch=1).submit(ask("What is in the image?", "scene.png"),
                                            SamplingParams(max_new_tokens=12)).result(timeout=60)
    words = reply.split()
    assert len(words) >= 6 and all(w.isascii() for w in words)


def test_word_tokenizer_padded_to_a_full_vocabulary_counts_every_id_as_one_token():
    """What the full-size random-weight benchmark model relies on (benchmarks/full_size_model.py):
    any id the model emits decodes to one word that encodes back to that same id."""
    tokenizer = build_word_tokenizer(248_320)
    assert len(tokenizer) == 248_320
    for token_id in (300, 12_345, 248_319):
        word = tokenizer.decode([token_id])
        assert tokenizer(word, add_special_tokens=False)["input_ids"] == [token_id]


def test_tiny_model_in_int4_loads_and_answers(tiny_dir, make_engine):
    loaded = load_model(Settings(model="tiny", tiny_model_dir=tiny_dir, quant="int4"))
    modules = dict(loaded.runner.model.named_modules())
    quantized = [m for m in modules.values() if type(m).__name__ == "Linear4bit"]
    assert len(quantized) == len([name for name, m in modules.items() if isinstance(m, torch.nn.Linear)
                                  and name.startswith("model.language_model.")]) > 10, "the language model's layers"
    weight = quantized[0].weight
    assert weight.quant_state.quant_type == "nf4" and weight.quant_state.nested  # double quant
    assert loaded.quantization.startswith("int4")
    engine = make_engine(loaded.runner, max_batch=4)
    streams = [engine.submit(ask(q, "chart.png"), SamplingParams(max_new_tokens=8)) for q in ("a", "b", "c")]
    assert all(s.result(timeout=120) for s in streams)


@pytest.mark.parametrize("quant, quantized_kind", [("int4", "Linear4bit"), ("int8", "Linear8bitLt")])
def test_quantization_keeps_the_vision_tower_merger_and_head_unquantized(quant, quantized_kind, tiny_dir, tmp_path,
                                                                         make_engine):
    """The published vision MLP width (4304) is no multiple of 64, which bitsandbytes' int4 CPU
    kernels refuse (on CPUs with AVX512-BF16) and its GPU kernels run slowly: only the language
    model is quantized, as in the official int4 releases. A tiny model with such a width loads
    and answers."""
    from transformers import AutoConfig, AutoProcessor, MiniCPMV4_6ForConditionalGeneration

    source = ensure_tiny_model(tiny_dir)
    config = AutoConfig.from_pretrained(source)
    config.vision_config.intermediate_size = 100
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = MiniCPMV4_6ForConditionalGeneration(config)
    save_checkpoint(model, AutoProcessor.from_pretrained(source), tmp_path / "odd-vision")
    loaded = load_model(Settings(model=str(tmp_path / "odd-vision"), quant=quant))
    kinds = {name: type(module).__name__ for name, module in loaded.runner.model.named_modules()
             if isinstance(module, torch.nn.Linear)}
    assert kinds["model.vision_tower.encoder.layers.0.mlp.fc1"] == "Linear"
    outside_text = {kind for name, kind in kinds.items() if not name.startswith("model.language_model.")}
    assert outside_text == {"Linear"}, "vision tower, merger and head stay unquantized"
    assert {kind for name, kind in kinds.items() if name.startswith("model.language_model.")} == {quantized_kind}
    assert loaded.runner.capturable == (quant == "int4"), "int8's outlier check cannot be captured: eager"
    engine = make_engine(loaded.runner, max_batch=2)
    streams = [engine.submit(ask(q, "chart.png"), SamplingParams(max_new_tokens=6)) for q in ("a", "b")]
    assert all(s.result(timeout=120) for s in streams)


def test_int8_says_once_that_it_computes_in_float16(caplog):
    """bitsandbytes' int8 matmul logs a warning on every call with bf16 input (about 170 lines a
    decode step of the published model): after loading in int8 it is said once."""
    import logging

    from minicpmv_demo.model.loading import quiet_int8_cast_warning

    quiet_int8_cast_warning()
    bnb_log = logging.getLogger("bitsandbytes.autograd._functions")
    with caplog.at_level(logging.WARNING, logger="bitsandbytes.autograd._functions"):
        for _ in range(5):
            bnb_log.warning("MatMul8bitLt: inputs will be cast from %s to float16 during quantization", "torch.bfloat16")
        bnb_log.warning("something else")
    messages = [r.getMessage() for r in caplog.records]
    assert sum(m.startswith("MatMul8bitLt") for m in messages) <= 1, "once per process (an int8 load may have said it)"
    assert messages[-1] == "something else", "other warnings still show"


def test_sampling_defaults_are_what_the_checkpoint_file_sets(loaded_tiny, make_engine, tiny_settings):
    """The tiny model ships MiniCPM-V 4.6's generation config; only the fields a file sets count."""
    folder = Path(loaded_tiny.runner.model.name_or_path)
    shipped = json.loads((folder / "generation_config.json").read_text())
    assert {k: shipped[k] for k in ("do_sample", "temperature", "top_p", "top_k")} == GENERATION_SAMPLING
    assert loaded_tiny.sampling_defaults == {"temperature": 0.7, "top_p": 1.0, "top_k": 0}
    service = ChatService(make_engine(started=False), tiny_settings, GpuMemory(), loaded_tiny.sampling_defaults)
    assert service.defaults == SamplingParams(max_new_tokens=tiny_settings.default_new_tokens, temperature=0.7,
                                              top_p=1.0, top_k=0, repetition_penalty=1.0)
    assert checkpoint_sampling(GenerationConfig(eos_token_id=[1], pad_token_id=0)) == {}
    assert checkpoint_sampling(GenerationConfig(do_sample=False, temperature=0.6, repetition_penalty=1.05)) == {
        "temperature": 0.0, "repetition_penalty": 1.05}, "do_sample false is greedy"
    named = checkpoint_sampling(GenerationConfig(temperature=5.0, top_k=50))
    clamped = ChatService(make_engine(started=False), tiny_settings, GpuMemory(), named).defaults
    assert (clamped.temperature, clamped.top_p, clamped.top_k) == (2.0, DEFAULT_TOP_P, 50), \
        "clamped like a client's; what the file leaves out is the server's own"
    assert ChatService(make_engine(started=False), tiny_settings, GpuMemory()).defaults.top_p == DEFAULT_TOP_P


@pytest.mark.parametrize("argv, message", [
    (["--model", "/nonexistent/model"], "does not exist"),
    (["--model", "someone/not-a-model-xyz"], "Could not find someone/not-a-model-xyz"),
    (["--device-map", "cuda"], "CUDA is not available"),
])
def test_load_errors_are_one_clear_line(argv, message, tiny_dir):
    """Through the real command line: exit code 2, one line on stderr, no traceback."""
    if argv[0] == "--device-map":
        argv = ["--model", "tiny", "--tiny-model-dir", tiny_dir, *argv]
    result = subprocess.run([sys.executable, "app.py", *argv], cwd=ROOT, capture_output=True, text=True,
                            timeout=120, env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().count("\n") == 0 or result.stderr.strip().splitlines()[-1].startswith("error:")


def test_not_a_model_folder_and_a_foreign_model(tmp_path, tiny_dir):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelLoadError, match="not a model folder"):
        load_model(Settings(model=str(empty)))
    other = tmp_path / "gpt2ish"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(ModelLoadError, match="not MiniCPM-V"):
        load_model(Settings(model=str(other)))


def test_int4_without_bitsandbytes_says_what_to_install(tiny_dir, monkeypatch):
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "bitsandbytes" else real_find_spec(name, *a))
    with pytest.raises(ModelLoadError, match="pip install bitsandbytes"):
        load_model(Settings(model="tiny", tiny_model_dir=tiny_dir, quant="int4"))


def test_auto_on_cpu_is_the_tiny_model():
    from minicpmv_demo.model.loading import resolve_model_id

    assert resolve_model_id(Settings(), cuda=False) == "tiny"
    assert resolve_model_id(Settings(), cuda=True) == "openbmb/MiniCPM-V-4.6"
    assert torch.cuda.is_available() is False


def test_cached_encoding_equals_the_processor(loaded_tiny):
    """The runner preprocesses each picture once; the result must be the processor's, exactly."""
    runner = loaded_tiny.runner
    for names in (("scene.png",), ("chart.png", "receipt.png"), ()):
        conversation = ask("Describe these.", *names)
        for _ in range(2):  # the second time from the cache
            mine = runner.encode(conversation).inputs
            text = runner.render(conversation)  # the chat template, with the thinking switch set
            pictures = [[image.image for image in conversation.images()]] if names else None
            reference = runner.processor(images=pictures, text=[text], return_tensors="pt")
            assert sorted(mine) == sorted(reference.keys())
            assert all(torch.equal(mine[key], reference[key]) for key in reference.keys())


def test_auto_dtype_avoids_float16_for_qwen35_models_on_gpus_without_bf16():
    from minicpmv_demo.model.loading import choose_dtype

    assert choose_dtype("auto", cuda=False, model_type="minicpmv4_6") == torch.float32
    assert choose_dtype("auto", cuda=True, model_type="minicpmv4_6", bf16=True) == torch.bfloat16
    assert choose_dtype("auto", cuda=True, model_type="minicpmv4_6", bf16=False) == torch.float32, "a T4"
    assert choose_dtype("auto", cuda=True, model_type="minicpmv", bf16=False) == torch.float16, "2.5's own dtype"
    assert choose_dtype("float16", cuda=True, model_type="minicpmv4_6", bf16=False) == torch.float16, "asked for"
