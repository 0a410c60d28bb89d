"""MiniCPM-V 2.6: the overrides on the 2.5 base (Qwen2 text model, NaViT positions per slice,
masked padding, chunked vision batches, ChatML, numbered pictures, slice placeholders) on the
tiny 2.6 checkpoints."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from minicpmv2_support import tiny_v26_dir, v25_cache  # noqa: F401 (fixtures)
from minicpmv_demo.intake.conversation import Conversation, PromptOptions, Turn
from minicpmv_demo.intake.images import PreparedImage

ASSETS = Path(__file__).resolve().parents[2] / "assets"

# config.json of openbmb/MiniCPM-V-2_6 (the keys that shape weights and that a loader must accept).
RELEASE_V26_CONFIG = {
    "version": 2.6, "architectures": ["MiniCPMV"], "model_type": "minicpmv", "attention_dropout": 0.0,
    "auto_map": {"AutoConfig": "configuration_minicpm.MiniCPMVConfig", "AutoModel": "modeling_minicpmv.MiniCPMV",
                 "AutoModelForCausalLM": "modeling_minicpmv.MiniCPMV"},
    "batch_vision_input": True, "bos_token_id": 151643, "drop_vision_last_layer": False, "eos_token_id": 151645,
    "hidden_act": "silu", "hidden_size": 3584, "image_size": 448, "intermediate_size": 18944,
    "max_position_embeddings": 32768, "max_window_layers": 28, "num_attention_heads": 28, "num_hidden_layers": 28,
    "num_key_value_heads": 4, "patch_size": 14, "query_num": 64, "rms_norm_eps": 1e-06, "rope_theta": 1000000.0,
    "slice_config": {"max_slice_nums": 9, "patch_size": 14, "model_type": "minicpmv"}, "slice_mode": True,
    "sliding_window": 131072, "tie_word_embeddings": False, "torch_dtype": "bfloat16", "use_cache": True,
    "use_image_id": True, "use_sliding_window": False, "vision_batch_size": 16, "vocab_size": 151666,
    "vision_config": {"hidden_size": 1152, "image_size": 980, "intermediate_size": 4304, "model_type": "siglip",
                      "num_attention_heads": 16, "num_hidden_layers": 27, "patch_size": 14},
}


@pytest.fixture(scope="session")
def v26(tiny_v26_dir):
    from minicpmv_demo.model.minicpmv2 import load

    return load(tiny_v26_dir, dtype=torch.float32)


def expected_v26_weights(config) -> dict[str, tuple[int, ...]]:
    """2.5's names (test_minicpmv2_weights) plus Qwen2's q/k/v biases."""
    from test_minicpmv2_weights import expected_weights

    names = expected_weights(config)
    kv = config.num_key_value_heads * (config.hidden_size // config.num_attention_heads)
    for i in range(config.num_hidden_layers):
        prefix = f"llm.model.layers.{i}.self_attn."
        names.update({prefix + "q_proj.bias": (config.hidden_size,), prefix + "k_proj.bias": (kv,),
                      prefix + "v_proj.bias": (kv,)})
    return names


def test_release_size_model_has_the_releases_weights():
    from minicpmv_demo.model.minicpmv2 import MiniCPMV26, MiniCPMV26Config

    config = MiniCPMV26Config(**RELEASE_V26_CONFIG)
    with torch.device("meta"):
        model = MiniCPMV26(config)
    shapes = {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}
    assert shapes == expected_v26_weights(config)
    assert len(shapes) == 339 + 437 + 13  # text model, vision tower (27 layers), resampler
    assert type(model.llm).__name__ == "Qwen2ForCausalLM" and model.resampler.attn.num_heads == 28


def test_tiny_checkpoint_names_and_config(tiny_v26_dir):
    import json

    from safetensors import safe_open

    from minicpmv_demo.model.minicpmv2 import MiniCPMV26Config

    written = json.loads((tiny_v26_dir / "config.json").read_text())
    assert set(written) >= set(RELEASE_V26_CONFIG) and written["version"] == 2.6
    config = MiniCPMV26Config.from_pretrained(tiny_v26_dir)
    with safe_open(tiny_v26_dir / "model.safetensors", "pt") as weights:
        stored = {name: tuple(weights.get_slice(name).get_shape()) for name in weights.keys()}
        assert {weights.get_slice(name).get_dtype() for name in weights.keys()} == {"BF16"}
    assert stored == expected_v26_weights(config)


def test_navit_positions_follow_each_slices_grid():
    from minicpmv_demo.model.minicpmv2.vision import navit_position_ids

    mask = torch.zeros((2, 1, 6), dtype=torch.bool)
    mask[0, 0, :6] = True
    mask[1, 0, :2] = True
    ids = navit_position_ids(mask, torch.tensor([[2, 3], [1, 2]], dtype=torch.int32), patches_per_side=10)
    # rows 0, 1 of 2 -> buckets 0, 5; columns 0..2 of 3 -> buckets 0, 3, 6 (row-major); padding -> 0
    assert ids.tolist() == [[0, 3, 6, 50, 53, 56], [0, 5, 0, 0, 0, 0]]


def test_slices_are_read_on_their_own(v26):
    """2.6 masks padding: a slice's features do not depend on what it is packed with, nor on
    `vision_batch_size` chunks; so features cached per picture are the prompt's."""
    model, processor = v26
    diagram = processor.slice(Image.open(ASSETS / "diagram.png"))  # a 5 x 12 whole, 8 x 8 slices
    favicon = processor.slice(Image.open(ASSETS / "favicon.png"))
    pixels = diagram.pixel_values + favicon.pixel_values
    sizes = torch.cat([diagram.tgt_sizes, favicon.tgt_sizes])
    with torch.inference_mode():
        together = model.vision_features(pixels, sizes)
        alone = torch.cat([model.vision_features(diagram.pixel_values, diagram.tgt_sizes),
                           model.vision_features(favicon.pixel_values, favicon.tgt_sizes)])
        model.config.vision_batch_size = 3
        try:
            chunked = model.vision_features(pixels, sizes)
        finally:
            model.config.vision_batch_size = 16
    assert model.vpm.config._attn_implementation == "eager"  # as the release runs its tower
    assert torch.allclose(together, alone, atol=1e-5) and torch.allclose(together, chunked, atol=1e-5)


def test_chatml_prompt_with_numbered_pictures(v26):
    _, processor = v26
    chart = Image.open(ASSETS / "chart.png")
    messages = [{"role": "user", "content": [chart, "What is this? "]}, {"role": "assistant", "content": " A chart."},
                {"role": "user", "content": [chart, chart, "And these?"]}]
    text = processor.render(messages)
    templated = processor.tokenizer.apply_chat_template(
        [{"role": "user", "content": "(<image>./</image>)\nWhat is this? "},
         {"role": "assistant", "content": " A chart."},
         {"role": "user", "content": "(<image>./</image>)\n(<image>./</image>)\nAnd these?"}],
        tokenize=False, add_generation_prompt=True)
    pieces = templated.split("(<image>./</image>)")
    expected = pieces[0] + "".join("".join(processor.picture_parts(chart.size, None, n)) + pieces[n + 1]
                                   for n in range(3))
    assert text == expected  # content is not stripped in 2.6
    assert text.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
                           "<|im_start|>user\n<image_id>0</image_id>")
    assert "<image_id>1</image_id>" in text and "<image_id>2</image_id>" in text
    assert text.endswith("<|im_start|>assistant\n")
    one = "<unk>" * processor.query_num
    rows = "\n".join(["".join([f"<slice>{one}</slice>"] * 3)] * 3)
    assert "".join(processor.picture_parts(chart.size, None, 4)) == f"<image_id>4</image_id><image>{one}</image>{rows}"
    ids, bound = processor.prompt_ids(messages)
    assert ids == processor.tokenizer.encode(text)  # no begin-of-text is added (Qwen2)
    assert bound.shape == (30, 2) and set((bound[:, 1] - bound[:, 0]).tolist()) == {processor.query_num}


def test_system_prompt_replaces_the_default(v26):
    _, processor = v26
    text = processor.render([{"role": "user", "content": "Hi"}], "Be brief.")
    assert text == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"


def test_stop_ids(v26):
    _, processor = v26
    tokenizer = processor.tokenizer
    assert processor.stop_token_ids == {tokenizer.convert_tokens_to_ids("<|im_end|>"),
                                        tokenizer.convert_tokens_to_ids("<|endoftext|>")}


def test_turn_lengths_add_up(v26):
    _, processor = v26
    chart = PreparedImage(image=Image.new("RGB", (640, 460)), digest="chart")
    turns = (Turn("user", "One?", images=(chart,)), Turn("assistant", "A."),
             Turn("user", "Two?", images=(chart, chart)))
    options = PromptOptions(max_slice_nums=4)
    prompt = processor.encode_conversation(Conversation(turns=turns, options=options))
    counted = processor.prompt_overhead + processor.message_length("system", processor.chat_format.system)
    counted += sum(processor.turn_length(turn, options, first) for turn, first in zip(turns, (0, 1, 1), strict=True))
    assert counted == prompt.length and prompt.picture_slices == [5, 5, 5]


def test_questions_with_and_without_pictures(v26):
    model, processor = v26
    scene, favicon = Image.open(ASSETS / "scene.png"), Image.open(ASSETS / "favicon.png")
    for messages in ([{"role": "user", "content": "Hello! What can you do?"}],
                     [{"role": "user", "content": [scene, favicon, "Compare them."]}]):
        prompt = processor.encode(messages)
        with torch.inference_mode():
            embeds = model.embed_prompt(prompt.input_ids, prompt.image_bound, pixel_values=prompt.pixel_values,
                                        tgt_sizes=prompt.tgt_sizes)
            tokens = model.generate_greedy(embeds, 8, processor.stop_token_ids)
        assert tokens and bool(torch.isfinite(embeds).all())


@pytest.mark.parametrize("dtype", [None, torch.float32])
def test_int4_loads_and_gives_finite_logits(v25_cache, v26, dtype):
    import bitsandbytes as bnb

    from minicpmv_demo.model.minicpmv2 import MiniCPMV26, ensure_tiny_v26

    model = MiniCPMV26.from_pretrained(ensure_tiny_v26(v25_cache, quantized=True), device_map="cpu",
                                       **({"dtype": dtype} if dtype else {})).eval()
    assert isinstance(model.llm.model.layers[0].self_attn.q_proj, bnb.nn.Linear4bit)
    assert not isinstance(model.llm.lm_head, bnb.nn.Linear4bit)
    processor = v26[1]
    prompt = processor.encode([{"role": "user", "content": [Image.open(ASSETS / "favicon.png"), "What?"]}])
    with torch.inference_mode():
        embeds = model.embed_prompt(prompt.input_ids, prompt.image_bound, pixel_values=prompt.pixel_values,
                                    tgt_sizes=prompt.tgt_sizes)
        assert bool(torch.isfinite(model.llm(inputs_embeds=embeds).logits).all())
