"""The native MiniCPM-V 2.5 model on the tiny checkpoints: loading, the position table, the
runner's API (vision features, prompt embeddings, decoding), several pictures, int4."""

from __future__ import annotations

import math
from pathlib import Path
import sys

import pytest
import torch
from PIL import Image

from minicpmv2_support import (tiny_v25_dir, tiny_v25_int4_dir, v25_cache, v25_model,  # noqa: F401 (fixtures)
                               v25_processor)
from minicpmv_demo.model.minicpmv2 import MiniCPMV25, load
from minicpmv_demo.model.minicpmv2.resampler import sincos_position_table

ASSETS = Path(__file__).resolve().parents[2] / "assets"


def reference_table(embed_dim: int, rows: int, columns: int) -> torch.Tensor:
    """The 2-D sine-cosine table written plainly in float64: [column part | row part]."""
    quarter = embed_dim // 4
    frequencies = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    table = torch.zeros(rows, columns, embed_dim, dtype=torch.float64)
    for axis, coordinate in ((0, torch.arange(columns, dtype=torch.float64)[None, :].expand(rows, columns)),
                             (1, torch.arange(rows, dtype=torch.float64)[:, None].expand(rows, columns))):
        angles = coordinate[..., None] * frequencies
        table[..., axis * 2 * quarter:(axis + 1) * 2 * quarter] = torch.cat([angles.sin(), angles.cos()], dim=-1)
    return table


def answer(model, processor, messages, max_new_tokens=12, **options):
    prompt = processor.encode(messages, **options)
    with torch.inference_mode():
        embeds = model.embed_prompt(prompt.input_ids, prompt.image_bound, pixel_values=prompt.pixel_values,
                                    tgt_sizes=prompt.tgt_sizes)
        return prompt, embeds, model.generate_greedy(embeds, max_new_tokens, processor.stop_token_ids)


def test_loads_with_plain_from_pretrained_and_no_remote_code(tiny_v25_dir):
    model, processor = load(tiny_v25_dir, dtype=torch.float32)
    assert type(model) is MiniCPMV25 and type(model).__module__.startswith("minicpmv_demo.")
    assert model.config.auto_map  # present in config.json like the release's, and never followed
    assert not any(name.startswith("transformers_modules") for name in sys.modules)
    assert model.config.max_position_embeddings == 8192 and processor.query_num == 8


@pytest.mark.parametrize("options", [{"device_map": "auto"}, {"attn_implementation": "eager"}])
def test_loading_options(tiny_v25_dir, v25_model, v25_processor, options):
    """device_map (a runner may spread a model over devices) and another attention kernel give
    the same answer."""
    model = MiniCPMV25.from_pretrained(tiny_v25_dir, dtype=torch.float32, **options).eval()
    messages = [{"role": "user", "content": [Image.open(ASSETS / "favicon.png"), "What is it?"]}]
    assert answer(model, v25_processor, messages, 6)[2] == answer(v25_model, v25_processor, messages, 6)[2]


def test_no_slices_give_no_features(v25_model):
    assert v25_model.vision_features([], torch.zeros((0, 2), dtype=torch.int32)).shape == (0, 8, 256)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_position_table_is_filled_after_from_pretrained(tiny_v25_dir, dtype):
    model = MiniCPMV25.from_pretrained(tiny_v25_dir, dtype=dtype)
    table = model.resampler.pos_embed
    assert table.shape == (70, 70, 256) and table.dtype == torch.float32
    assert torch.equal(table, torch.from_numpy(sincos_position_table(256, 70, 70)))
    assert torch.allclose(table.double(), reference_table(256, 70, 70), atol=1e-4)
    assert float(table.abs().sum()) > 0 and bool(torch.isfinite(table).all())


def test_position_table_grows_for_a_long_slice(v25_model):
    resampler = v25_model.resampler
    x = torch.randn(1, 3 * 90, resampler.kv_proj.in_features)
    with torch.inference_mode():
        out = resampler(x, torch.tensor([[3, 90]], dtype=torch.int32))
    assert out.shape == (1, 8, 256) and resampler.pos_embed.shape == (70, 90, 256)
    assert torch.allclose(resampler.pos_embed.double(), reference_table(256, 70, 90), atol=1e-4)


def test_resampler_masks_padding(v25_model):
    """A slice resamples the same alone and packed beside a longer one (keys are masked)."""
    resampler = v25_model.resampler
    torch.manual_seed(0)
    short, long = torch.randn(1, 12, 64), torch.randn(1, 20, 64)
    packed = torch.cat([torch.nn.functional.pad(short, (0, 0, 0, 8)), long])
    with torch.inference_mode():
        alone = resampler(short, torch.tensor([[3, 4]]))
        together = resampler(packed, torch.tensor([[3, 4], [4, 5]]))
    assert torch.allclose(alone[0], together[0], atol=1e-5)


def test_text_only_question(v25_model, v25_processor):
    prompt, embeds, tokens = answer(v25_model, v25_processor, [{"role": "user", "content": "Hello! What can you do?"}])
    assert prompt.pixel_values == [] and embeds.shape == (1, prompt.length, 256)
    assert torch.equal(embeds[0], v25_model.llm.get_input_embeddings()(prompt.input_ids)[0])
    assert 1 <= len(tokens) <= 12
    # the runner-style loop decodes as transformers' own greedy generate does
    with torch.inference_mode():
        reference = v25_model.llm.generate(inputs_embeds=embeds, max_new_tokens=12, do_sample=False,
                                           eos_token_id=sorted(v25_processor.stop_token_ids), pad_token_id=0)
    assert tokens == reference[0].tolist()[:len(tokens)]


def test_picture_large_enough_to_slice(v25_model, v25_processor):
    chart = Image.open(ASSETS / "chart.png")
    prompt, embeds, tokens = answer(v25_model, v25_processor, [{"role": "user", "content": [chart, "What is this?"]}])
    assert prompt.picture_slices == [10] and len(tokens) >= 1
    with torch.inference_mode():
        features = v25_model.vision_features(prompt.pixel_values, prompt.tgt_sizes)
    assert features.shape == (10, 8, 256) and bool(torch.isfinite(features).all())
    for (start, end), slice_features in zip(prompt.image_bound.tolist(), features, strict=True):
        assert torch.equal(embeds[0, start:end], slice_features)
    text_positions = torch.ones(prompt.length, dtype=torch.bool)
    for start, end in prompt.image_bound.tolist():
        text_positions[start:end] = False
    token_embeds = v25_model.llm.get_input_embeddings()(prompt.input_ids)[0]
    assert torch.equal(embeds[0, text_positions], token_embeds[text_positions])


def test_the_picture_changes_the_answer(v25_model, v25_processor):
    chart, scene = Image.open(ASSETS / "chart.png"), Image.open(ASSETS / "scene.png")
    logits = []
    for picture in (chart, scene):
        prompt = v25_processor.encode([{"role": "user", "content": [picture, "What is this?"]}])
        with torch.inference_mode():
            embeds = v25_model.embed_prompt(prompt.input_ids, prompt.image_bound, pixel_values=prompt.pixel_values,
                                            tgt_sizes=prompt.tgt_sizes)
            logits.append(v25_model.llm(inputs_embeds=embeds).logits[0, -1])
    assert not torch.allclose(logits[0], logits[1])


def test_several_pictures_and_turns(v25_model, v25_processor):
    scene, receipt, favicon = (Image.open(ASSETS / f"{name}.png") for name in ("scene", "receipt", "favicon"))
    messages = [{"role": "user", "content": [scene, receipt, "Compare them."]},
                {"role": "assistant", "content": "One is a receipt."},
                {"role": "user", "content": [favicon, "And this small one?"]}]
    prompt, embeds, tokens = answer(v25_model, v25_processor, messages, system_prompt="Be brief.")
    assert prompt.picture_slices == [9, 10, 1] and len(prompt.image_bound) == 20 and len(tokens) >= 1
    # Features cached per picture and concatenated in the prompt's order give the release's
    # numbers when the pictures' longest slices are alike (scene and receipt: 63 patches) ...
    per_picture, start = [], 0
    with torch.inference_mode():
        for count in prompt.picture_slices[:2]:
            per_picture.append(v25_model.vision_features(prompt.pixel_values[start:start + count],
                                                         prompt.tgt_sizes[start:start + count]))
            start += count
        both = v25_model.vision_features(prompt.pixel_values[:19], prompt.tgt_sizes[:19])
        everything = v25_model.vision_features(prompt.pixel_values, prompt.tgt_sizes)
    assert torch.allclose(torch.cat(per_picture), both, atol=1e-5)
    # ... but 2.5's vision tower sees the padding of a prompt's shorter slices (the release's
    # mask), so packed with the favicon's 64-patch slice they come out (slightly) different.
    assert not torch.allclose(everything[:19], both, atol=1e-5)


def test_embed_prompt_checks_placeholders(v25_model, v25_processor):
    prompt = v25_processor.encode([{"role": "user", "content": [Image.open(ASSETS / "favicon.png"), "Hi"]}])
    with torch.inference_mode():
        features = v25_model.vision_features(prompt.pixel_values, prompt.tgt_sizes)
        with pytest.raises(ValueError, match="placeholders"):
            v25_model.embed_prompt(prompt.input_ids, prompt.image_bound)
        with pytest.raises(ValueError, match="do not fit"):
            v25_model.embed_prompt(prompt.input_ids, prompt.image_bound, features=torch.cat([features, features]))
        with pytest.raises(ValueError, match="one prompt"):
            v25_model.embed_prompt(prompt.input_ids.repeat(2, 1), prompt.image_bound, features=features)


def test_parts_in_different_precisions_still_run(tiny_v25_dir, v25_processor):
    """A float16 language model beside a float32 vision tower and resampler (what an int4 load
    with another compute dtype can give) takes pictures without dtype errors."""
    model = MiniCPMV25.from_pretrained(tiny_v25_dir, dtype=torch.float16).eval()
    model.vpm.float()
    model.resampler.float()
    messages = [{"role": "user", "content": [Image.open(ASSETS / "diagram.png"), "Hi"]}]
    _, embeds, tokens = answer(model, v25_processor, messages, max_new_tokens=3)
    assert embeds.dtype == torch.float16 and bool(torch.isfinite(embeds).all()) and tokens


@pytest.mark.parametrize("dtype", [None, torch.float16, torch.bfloat16, torch.float32])
def test_int4_loads_and_gives_finite_logits(tiny_v25_int4_dir, v25_processor, dtype):
    import bitsandbytes as bnb

    options = {"device_map": "cpu"} | ({"dtype": dtype} if dtype else {})
    model = MiniCPMV25.from_pretrained(tiny_v25_int4_dir, **options).eval()
    quantized = {name for name, module in model.named_modules() if isinstance(module, bnb.nn.Linear4bit)}
    assert "llm.model.layers.0.self_attn.q_proj" in quantized and "llm.model.layers.1.mlp.down_proj" in quantized
    assert not any(name.startswith(("vpm.", "resampler.", "llm.lm_head")) for name in quantized)
    assert model.llm.model.layers[0].mlp.down_proj.compute_dtype == torch.float16  # the release's compute dtype
    assert torch.equal(model.resampler.pos_embed, torch.from_numpy(sincos_position_table(256, 70, 70)))
    prompt = v25_processor.encode([{"role": "user", "content": [Image.open(ASSETS / "receipt.png"), "Total?"]}],
                                  max_slice_nums=2)
    with torch.inference_mode():
        embeds = model.embed_prompt(prompt.input_ids, prompt.image_bound, pixel_values=prompt.pixel_values,
                                    tgt_sizes=prompt.tgt_sizes)
        logits = model.llm(inputs_embeds=embeds).logits
        tokens = model.generate_greedy(embeds, 4, v25_processor.stop_token_ids)
    assert bool(torch.isfinite(logits).all()) and tokens
    assert all(0 <= token < model.config.vocab_size for token in tokens)


def test_int4_from_a_16_bit_checkpoint_on_the_fly(tiny_v25_dir, v25_processor):
    """`--quant int4` style: a BitsAndBytesConfig at load time, 16-bit modules as the project keeps them."""
    from transformers import BitsAndBytesConfig

    from minicpmv_demo.model.loading import UNQUANTIZED_MODULES

    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                      bnb_4bit_compute_dtype=torch.bfloat16, llm_int8_skip_modules=UNQUANTIZED_MODULES)
    model = MiniCPMV25.from_pretrained(tiny_v25_dir, dtype=torch.bfloat16, device_map="cpu",
                                       quantization_config=quantization).eval()
    _, embeds, tokens = answer(model, v25_processor, [{"role": "user", "content": "Hi"}], max_new_tokens=3)
    assert bool(torch.isfinite(embeds).all()) and tokens
    assert math.isclose(float(model.resampler.pos_embed[0, 1, 0]), math.sin(1.0), rel_tol=1e-6)
