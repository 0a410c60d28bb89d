"""Visual detail per request: `downsample_mode` and `max_slice_nums` reach the processor (the
placeholder count), the vision tower (its output) and the caches, on the tiny model.

The tiny model's image processor cuts 112-px slices, so a 112x112 picture is one slice, and a
224x224 one is a source plus a 2x2 grid of slices; a slice is 4 visual tokens at "16x" and 16 at
"4x".
"""

from __future__ import annotations

import torch
from PIL import Image

from conftest import wait_until
from minicpmv_demo.intake.conversation import Conversation, PromptOptions, Turn
from minicpmv_demo.engine import SamplingParams
from minicpmv_demo.intake.images import prepare_image
from minicpmv_demo.model.minicpmv4.runner import MiniCPMV4Runner, _visual_key

GREEDY = SamplingParams(max_new_tokens=8, temperature=0.0)


def picture(tmp_path, side: int, colour=(200, 40, 40)):
    """A prepared picture with a gradient (so slices differ) of `side` x `side` pixels."""
    image = Image.new("RGB", (side, side), colour)
    for x in range(side):
        image.putpixel((x, x), (x % 256, 255 - x % 256, 90))
    path = tmp_path / f"p{side}-{colour[0]}.png"
    image.save(path)
    return prepare_image(path)


def question(image, options: PromptOptions = PromptOptions(), text: str = "What is here?") -> Conversation:
    return Conversation(turns=(Turn("user", text, images=(image,)),), options=options)


def placeholders(runner: MiniCPMV4Runner, conversation: Conversation) -> int:
    ids = runner.encode(conversation).inputs["input_ids"][0]
    return int((ids == runner.model.config.image_token_id).sum())


def fresh_runner(loaded) -> MiniCPMV4Runner:
    """A runner of its own (empty caches) on the shared tiny model."""
    return MiniCPMV4Runner(loaded.runner.model, loaded.runner.processor)


def test_fine_detail_gives_four_times_the_visual_tokens_and_another_vision_output(tmp_path, loaded_tiny):
    runner = fresh_runner(loaded_tiny)
    image = picture(tmp_path, 112)
    coarse, fine = PromptOptions(max_slice_nums=1), PromptOptions(downsample_mode="4x", max_slice_nums=1)
    assert placeholders(runner, question(image, coarse)) == 4
    assert placeholders(runner, question(image, fine)) == 16
    coarse_features = runner._visual_features(runner.encode(question(image, coarse)), "image")
    fine_features = runner._visual_features(runner.encode(question(image, fine)), "image")
    assert [f.shape[0] for f in coarse_features] == [4] and [f.shape[0] for f in fine_features] == [16]
    # The tower ran in each mode: with "16x" it would give 4 tokens for the fine prompt's slice,
    # and its 16 placeholders could not be filled.
    assert not torch.equal(fine_features[0][:4], coarse_features[0])
    # Both are cached, each under its own settings.
    for options, features in ((coarse, coarse_features), (fine, fine_features)):
        assert runner._vision_cache.get(_visual_key("image", options, [image.digest])) is features


def test_slices_change_the_placeholder_count_and_the_default_is_the_checkpoints(tmp_path, loaded_tiny):
    runner = fresh_runner(loaded_tiny)
    image = picture(tmp_path, 224)
    assert placeholders(runner, question(image, PromptOptions(max_slice_nums=1))) == 4  # the source alone
    assert placeholders(runner, question(image, PromptOptions(max_slice_nums=4))) == 4 + 4 * 4
    assert placeholders(runner, question(image)) == 4 + 4 * 4  # tiny checkpoint's default: 4 slices
    assert placeholders(runner, question(image, PromptOptions(downsample_mode="4x"))) == 16 + 4 * 16


def test_turn_length_counts_with_the_requests_settings(tmp_path, loaded_tiny):
    runner = fresh_runner(loaded_tiny)
    turn = Turn("user", "What is here?", images=(picture(tmp_path, 224),))
    settings = (PromptOptions(), PromptOptions(downsample_mode="4x"), PromptOptions(max_slice_nums=1))
    measured = [runner.turn_length(turn, options) for options in settings]
    encoded = [runner.encode(Conversation(turns=(turn,), options=options)).length for options in settings]
    assert measured[1] - measured[0] == encoded[1] - encoded[0] == 60  # 4 times the 20 placeholders
    assert measured[0] - measured[2] == encoded[0] - encoded[2] > 16  # 4 slices less, with their markers
    assert all(m >= e for m, e in zip(measured, encoded, strict=True)), "never undercounted"


def test_requests_with_different_settings_share_one_batch_and_answer_as_alone(tmp_path, make_engine, loaded_tiny):
    image = picture(tmp_path, 224)
    settings = [PromptOptions(), PromptOptions(downsample_mode="4x"), PromptOptions(max_slice_nums=1),
                PromptOptions(downsample_mode="4x", max_slice_nums=2)]
    alone = []
    for options in settings:
        engine = make_engine(fresh_runner(loaded_tiny), max_batch=1)
        alone.append(engine.submit(question(image, options), GREEDY).result(timeout=60))
    engine = make_engine(fresh_runner(loaded_tiny), started=False, max_batch=4)
    streams = [engine.submit(question(image, options), GREEDY) for options in settings]
    engine.start()
    assert [s.result(timeout=60) for s in streams] == alone
    assert [s.stats.batch_size for s in streams] == [4, 4, 4, 4]
    assert len(set(alone)) > 1, "the settings changed what the model saw"


def test_a_long_prompt_prefilled_in_pieces_keeps_its_settings(tmp_path, make_engine, loaded_tiny):
    """A prompt longer than one prefill piece takes the pieces path; its fine-detail features
    must still be the ones scattered in."""
    image = picture(tmp_path, 224)
    text = " ".join(["the picture shows a house by the sea"] * 60)
    fine = question(image, PromptOptions(downsample_mode="4x"), text=text)
    runner = fresh_runner(loaded_tiny)
    assert runner.encode(fine).length > 300
    alone = make_engine(runner, max_batch=1).submit(fine, GREEDY).result(timeout=60)
    engine = make_engine(fresh_runner(loaded_tiny), max_batch=2)
    busy = engine.submit(question(image), SamplingParams(max_new_tokens=200, temperature=0.0))
    assert wait_until(lambda: engine.active_rows == 1)
    assert engine.submit(fine, GREEDY).result(timeout=60) == alone
    busy.cancel()
