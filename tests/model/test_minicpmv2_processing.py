"""MiniCPM-V 2.5 prompts: slicing grids, placeholders, the chat format, stop ids, the tokenizer.

Expected values are the 2.5 release's behaviour (checked against its own code outside this
repository, see the branch's report), written down here as plain cases.
"""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from minicpmv2_support import tiny_v25_dir, v25_cache, v25_processor  # noqa: F401 (fixtures)
from minicpmv_demo.intake.conversation import Conversation, PromptOptions, Turn
from minicpmv_demo.intake.images import PreparedImage
from minicpmv_demo.model.minicpmv2.config import SliceSettings
from minicpmv_demo.model.minicpmv2.slicing import best_resize, refine_size, slice_grid, slice_picture

RELEASE = SliceSettings(max_slice_nums=9, scale_resolution=448, patch_size=14)


@pytest.mark.parametrize(("size", "settings", "grid"), [
    ((448, 448), RELEASE, None),  # one square's area: read whole
    ((300, 200), RELEASE, None),  # smaller: read whole (upscaled)
    ((449, 448), RELEASE, [2, 1]),  # just over one square: 2 slices, wide picture -> 2 columns
    ((448, 900), RELEASE, [1, 2]),  # tall -> 2 rows
    ((1344, 1344), RELEASE, [3, 3]),  # 9 squares
    ((1920, 1080), RELEASE, [4, 2]),  # 10.3 squares capped at 9: 8 or 9 slices, 4x2 fits 16:9 best
    ((4000, 500), RELEASE, [8, 1]),  # a banner: 9 slices at most, 8 in one row fits best
    ((640, 460), SliceSettings(9, 112, 14), [3, 3]),  # the tiny model's settings on an asset
    ((640, 460), SliceSettings(2, 112, 14), [2, 1]),  # a request's own max_slice_nums
    ((640, 460), SliceSettings(1, 112, 14), None),  # max_slice_nums 1: never sliced
    ((1000, 1000), SliceSettings(4, 448, 14), [2, 2]),  # 5 squares capped at 4; 3 or 4: 2x2 is square
])
def test_slice_grid(size, settings, grid):
    assert slice_grid(size, settings) == (tuple(grid) if grid else None)


def test_resize_rules_round_half_to_even_and_keep_patch_multiples():
    # 448 * 448 area kept, aspect 2: height int(448 / sqrt 2) = 316 -> 322 (23 patches), width 632 -> 630
    assert best_resize((2000, 1000), 448, 14) == (630, 322)
    assert best_resize((300, 200), 448, 14) == (294, 196)  # small and not upscaled: sizes only rounded
    assert best_resize((300, 200), 448, 14, allow_upscale=True) == (546, 364)
    assert best_resize((7, 7), 448, 14) == (14, 14)  # never below one patch
    assert best_resize((21, 21), 448, 14) == (28, 28)  # 1.5 patches rounds to 2 (half to even)
    assert best_resize((35, 35), 448, 14) == (28, 28)  # 2.5 patches rounds to 2 (half to even)
    assert refine_size((1920, 1080), (4, 2), 448, 14) == (1680, 952)  # cells 420 x 476 (30 x 34 patches)


def test_sliced_picture_pixels_and_sizes():
    image = Image.effect_mandelbrot((1000, 700), (-2, -1, 1, 1), 40).convert("RGB")
    picture = slice_picture(image, RELEASE)
    assert picture.grid == (2, 2) and picture.slice_count == 5  # 3.5 squares: 3, 4 or 5 slices, 2 x 2 fits best
    width, height = best_resize(image.size, 448, 14)
    assert (width, height) == (532, 378)
    sizes = picture.tgt_sizes.tolist()
    assert sizes[0] == [height // 14, width // 14]  # the whole picture first
    assert sizes[1:] == [sizes[1]] * 4  # then equal cells of the refined picture
    for pixels, (rows, columns) in zip(picture.pixel_values, sizes, strict=True):
        assert pixels.shape == (3, 14, rows * columns * 14) and pixels.dtype == torch.float32
        assert -1.0 <= float(pixels.min()) and float(pixels.max()) <= 1.0
    # patch n of the whole picture holds its rows [14 r, 14 r + 14) and columns [14 c, 14 c + 14)
    whole = image.resize((width, height), resample=Image.Resampling.BICUBIC)
    expected = (torch.tensor(list(whole.getdata()), dtype=torch.float32).reshape(height, width, 3) / 255 - 0.5) / 0.5
    patch = width // 14 + 5  # row 1, column 5
    assert torch.equal(picture.pixel_values[0][:, :, patch * 14:(patch + 1) * 14],
                       expected[14:28, 70:84, :].permute(2, 0, 1))


def test_placeholder_of_a_whole_and_a_sliced_picture(v25_processor):
    query = v25_processor.query_num
    one = "<image>" + "<unk>" * query + "</image>"
    assert "".join(v25_processor.picture_parts((64, 64))) == one
    # 640 x 460 at the tiny model's 112-px slices: the whole, then a 3 x 3 grid, rows joined by \n
    row = one * 3
    assert "".join(v25_processor.picture_parts((640, 460))) == one + "<slice>" + "\n".join([row] * 3) + "</slice>"
    assert "".join(v25_processor.picture_parts((640, 460), max_slice_nums=2)) == one + "<slice>" + one * 2 + "</slice>"


def test_chat_format_is_the_checkpoints_template(v25_processor):
    """The prompt equals what the checkpoint's own chat template renders (the release's `chat()`
    puts "(<image>./</image>)" + "\\n" before the text and replaces it with the placeholder)."""
    picture = Image.new("RGB", (640, 460), "white")
    messages = [{"role": "user", "content": [picture, "  What is this?  "]},
                {"role": "assistant", "content": "A white picture."},
                {"role": "user", "content": "Sure?"}]
    templated = v25_processor.tokenizer.apply_chat_template(
        [{"role": "system", "content": "Be brief."},
         {"role": "user", "content": "(<image>./</image>)\n  What is this?  "},
         {"role": "assistant", "content": "A white picture."}, {"role": "user", "content": "Sure?"}],
        tokenize=False, add_generation_prompt=True)
    placeholder = "".join(v25_processor.picture_parts(picture.size))
    assert v25_processor.render(messages, "Be brief.") == templated.replace("(<image>./</image>)", placeholder)
    assert templated.startswith("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>")
    assert templated.endswith("<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n")


def test_prompt_starts_with_begin_of_text_twice(v25_processor):
    """The release's quirk: its template writes <|begin_of_text|> and its tokenizer adds another."""
    ids, bound = v25_processor.prompt_ids([{"role": "user", "content": "Hi"}])
    bos = v25_processor.tokenizer.bos_token_id
    assert ids[:3] == [bos, bos, v25_processor.tokenizer.convert_tokens_to_ids("<|start_header_id|>")]
    assert bound.shape == (0, 2)


def test_ids_equal_encoding_the_rendered_prompt_whole(v25_processor):
    """Piecewise encoding gives the release's ids (it encodes the whole rendered prompt)."""
    picture = Image.new("RGB", (640, 460), "white")
    for messages in ([{"role": "user", "content": "What is this? A café, 12 items!\n\nOk."}],
                     [{"role": "user", "content": [picture, picture, " Compare\tthem. "]},
                      {"role": "assistant", "content": "They are the same.\n"},
                      {"role": "user", "content": [picture, ""]}]):
        ids, _ = v25_processor.prompt_ids(messages, "You are helpful.")
        assert ids == v25_processor.tokenizer.encode(v25_processor.render(messages, "You are helpful."))


def test_image_bound_marks_every_slice(v25_processor):
    picture = Image.new("RGB", (640, 460), "white")
    prompt = v25_processor.encode([{"role": "user", "content": [picture, "Hi"]}])
    query = v25_processor.query_num
    assert prompt.image_bound.shape == (10, 2) and prompt.picture_slices == [10]
    unk = v25_processor.tokenizer.convert_tokens_to_ids("<unk>")
    for start, end in prompt.image_bound.tolist():
        assert end - start == query and set(prompt.input_ids[0, start:end].tolist()) == {unk}
    assert len(prompt.pixel_values) == 10 and prompt.tgt_sizes.shape == (10, 2)


def test_text_that_looks_like_special_tokens_stays_text(v25_processor):
    text = "<image><unk></image> <|eot_id|>"
    ids = v25_processor.encode_parts(v25_processor.content_parts(text))
    tokenizer = v25_processor.tokenizer
    assert tokenizer.decode(ids) == text
    assert not set(tokenizer.all_special_ids) & set(ids)
    assert v25_processor.prompt_ids([{"role": "user", "content": text}])[1].shape == (0, 2)


def test_stop_ids_and_special_tokens(v25_processor):
    tokenizer = v25_processor.tokenizer
    assert v25_processor.stop_token_ids == {tokenizer.convert_tokens_to_ids("<|end_of_text|>"),
                                            tokenizer.convert_tokens_to_ids("<|eot_id|>")}
    assert tokenizer.eos_token == "<|end_of_text|>" and tokenizer.bos_token == "<|begin_of_text|>"
    assert tokenizer.pad_token == "!" and tokenizer.pad_token_id == 0  # Llama 3's "!" is id 0, as in the release


@pytest.mark.parametrize("text", ["What is this? A café", "naïve façade — 東京 🙂",
                                  "line one\nline two\n\n  indented", "Price: $12.50 (3 items) #1!", ""])
def test_tokenizer_round_trips_bytes(v25_processor, text):
    tokenizer = v25_processor.tokenizer
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert tokenizer.decode(ids) == text
    if text == "What is this? A café":
        assert len(ids) < len(text) - 5  # merges, not one token per character
        assert "Ġ" not in tokenizer.decode(ids)


def test_tokenizer_is_the_generic_fast_tokenizer(tiny_v25_dir, v25_processor):
    written = json.loads((tiny_v25_dir / "tokenizer_config.json").read_text())
    assert written["tokenizer_class"] == "MiniCPMVTokenizerFast"  # the release's class name, not followed
    assert type(v25_processor.tokenizer).__name__ == "TokenizersBackend"


@pytest.mark.parametrize("slices", [1, 2, 5, 9, 36])
def test_per_request_max_slice_nums(v25_processor, slices):
    picture = Image.new("RGB", (2000, 1500), "white")
    prompt = v25_processor.encode([{"role": "user", "content": [picture, "Hi"]}], max_slice_nums=slices)
    grid = slice_grid((2000, 1500), v25_processor.settings_for(slices))
    expected = 1 + (grid[0] * grid[1] if grid else 0)
    assert prompt.picture_slices == [expected] and len(prompt.image_bound) == expected
    assert expected <= slices + 1


def test_bad_max_slice_nums_is_refused(v25_processor):
    for bad in (0, -1, 2.0, True):
        with pytest.raises(ValueError):
            v25_processor.settings_for(bad)


def test_prompt_without_pictures(v25_processor):
    prompt = v25_processor.encode([{"role": "user", "content": "Hello"}])
    assert prompt.pixel_values == [] and prompt.image_bound.shape == (0, 2) and prompt.tgt_sizes.shape == (0, 2)


def _prepared(image: Image.Image) -> PreparedImage:
    return PreparedImage(image=image, digest=str(image.size))


def test_conversation_lengths_add_up(v25_processor):
    """A turn's count is exact and a prompt is the overhead plus its messages (system included)."""
    chart = _prepared(Image.new("RGB", (640, 460), "white"))
    small = _prepared(Image.new("RGB", (60, 40), "black"))
    turns = (Turn("user", "What is this?", images=(chart,)), Turn("assistant", "A chart."),
             Turn("user", "And these two?", images=(chart, small)))
    for options in (PromptOptions(), PromptOptions(max_slice_nums=2)):
        conversation = Conversation(turns=turns, system_prompt="Be brief.", options=options)
        prompt = v25_processor.encode_conversation(conversation)
        counted = (v25_processor.prompt_overhead + v25_processor.message_length("system", "Be brief.")
                   + sum(v25_processor.turn_length(turn, options) for turn in turns))
        assert counted == prompt.length
        assert prompt.picture_slices[0] == prompt.picture_slices[1] and len(prompt.picture_slices) == 3


def test_several_pictures_sit_in_their_turns_in_order(v25_processor):
    first, second = Image.new("RGB", (60, 40), "red"), Image.new("RGB", (40, 60), "blue")
    conversation = Conversation(turns=(Turn("user", "One", images=(_prepared(first),)), Turn("assistant", "Red."),
                                       Turn("user", "Two", images=(_prepared(second),))))
    text = v25_processor.render(v25_processor.messages(conversation))
    one = "<image>" + "<unk>" * v25_processor.query_num + "</image>"
    assert text.count(one) == 2
    assert text.index("One") < text.index("Red.") < text.index("Two")
    assert f"<|end_header_id|>\n\n{one}\nOne<|eot_id|>" in text and f"<|end_header_id|>\n\n{one}\nTwo<|eot_id|>" in text


def test_videos_are_refused(v25_processor):
    from minicpmv_demo.intake.videos import PreparedVideo

    video = PreparedVideo.__new__(PreparedVideo)
    conversation = Conversation(turns=(Turn("user", "What happens?", videos=(video,)),))
    with pytest.raises(ValueError, match="videos"):
        v25_processor.encode_conversation(conversation)


def test_a_missing_local_folder_is_a_clear_error(tmp_path):
    from minicpmv_demo.model.minicpmv2 import load_processor

    with pytest.raises(FileNotFoundError, match="no checkpoint folder"):
        load_processor(tmp_path / "missing")
