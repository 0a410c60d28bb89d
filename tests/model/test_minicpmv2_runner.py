"""MiniCPM-V 2.5 and 2.6 served by the engine (model/minicpmv2/runner.py) on the tiny checkpoints,
loaded by `load_model` as the app loads them: batched rows equal solo rows token for token and
the model code's own greedy loop, joins, Stop, slices, pictures, turns, long chats, int4, no
remote code, videos refused."""

from __future__ import annotations

import json
import shutil
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from clips import make_clip
from conftest import ask, asset_image, wait_until
from minicpmv2_support import GatedRunner, tiny_v25_dir, tiny_v25_int4_dir, tiny_v26_dir, v25_cache  # noqa: F401
from minicpmv_demo.config.settings import Settings, parse_settings
from minicpmv_demo.engine import Engine, FinishReason, SamplingParams
from minicpmv_demo.engine.context import fit_to_context
from minicpmv_demo.intake.conversation import Conversation, PromptOptions, Turn
from minicpmv_demo.intake.message import InputError
from minicpmv_demo.intake.videos import VideoLimits, prepare_video
from minicpmv_demo.model import ModelLoadError, load_model
from minicpmv_demo.model.minicpmv2.runner import CHAT_SAMPLING, MiniCPMV2Runner
from minicpmv_demo.system.gpu import GpuMemory
from minicpmv_demo.web.chat_service import ChatService, upload_root

GREEDY = SamplingParams(max_new_tokens=16, temperature=0.0)
HISTORY = (Turn("user", "What is this?", images=(asset_image("scene.png"),)),
           Turn("assistant", "A house by a lake."))
# Pictures whole and sliced (chart.png and receipt.png are cut into grids at the tiny 112-px
# slices), two in one message, pictures in two turns with a system prompt, and none.
QUESTIONS = [
    ask("What is in the image?", "scene.png"),
    ask("Read the total.", "receipt.png"),
    ask("Compare the two pictures.", "chart.png", "scene.png"),
    replace(ask("And this one?", "diagram.png", history=HISTORY), system_prompt="Answer briefly."),
    ask("Say hello without any image."),
    ask("What colour is it?", "favicon.png"),
]


@pytest.fixture(scope="module", params=["2.5", "2.6"])
def runner(request, tiny_v25_dir, tiny_v26_dir) -> MiniCPMV2Runner:
    folder = tiny_v25_dir if request.param == "2.5" else tiny_v26_dir
    return load_model(Settings(model=str(folder))).runner


@pytest.fixture(scope="module")
def v25_runner(tiny_v25_dir) -> MiniCPMV2Runner:
    return load_model(Settings(model=str(tiny_v25_dir))).runner


@pytest.fixture
def engines():
    """Start engines; every one is shut down after the test."""
    started: list[Engine] = []

    def start(runner, started_now: bool = True, **options) -> Engine:
        engine = Engine(runner, cache_size=0, **options)
        started.append(engine)
        return engine.start() if started_now else engine

    yield start
    for engine in started:
        engine.shutdown()


def model_greedy(runner: MiniCPMV2Runner, conversation: Conversation, max_new_tokens: int) -> list[int]:
    """The model code's own greedy loop (checked against the release's) on the prompt its processor
    encodes, every slice of the prompt through the vision tower at once as the release's `chat()`
    reads them: the ground truth for the runner's rows."""
    prompt = runner.processor.encode_conversation(conversation)
    with torch.inference_mode():
        embeds = runner.model.embed_prompt(prompt.input_ids, prompt.image_bound, pixel_values=prompt.pixel_values,
                                           tgt_sizes=prompt.tgt_sizes)
        return runner.model.generate_greedy(embeds, max_new_tokens, runner.stop_token_ids)


def slot_rows(runner: MiniCPMV2Runner, conversations: list[Conversation], steps: int, join_at: int) -> list[list[int]]:
    """Greedy tokens of rows run as the engine runs them: all but the last prefilled together
    (left-padded) into preallocated slots, the last prefilled alone and joined after `join_at`
    steps; a row that reaches a stop id keeps its slot and goes on (its tokens are cut there later)."""
    batch = runner.new_slots(len(conversations), 1024, capture=False)
    rows: list[list[int]] = []

    def join(prompts):
        prefilled, logits = runner.prefill(prompts, [[] for _ in prompts])
        runner.merge(batch, prefilled)
        rows.extend([token] for token in logits.argmax(dim=-1).tolist())

    prompts = [runner.encode(conversation) for conversation in conversations]
    join(prompts[:-1])
    for step in range(steps):
        if step == join_at:
            join(prompts[-1:])
        logits = runner.step(batch, torch.tensor([row[-1] for row in rows]))
        for row, token in zip(rows, logits.argmax(dim=-1).tolist(), strict=True):
            row.append(token)
    return rows


def until_stop(tokens: list[int], stops: frozenset[int]) -> list[int]:
    ends = [i for i, token in enumerate(tokens) if token in stops]
    return tokens[:ends[0] + 1] if ends else tokens


def test_rows_in_slots_equal_the_models_own_greedy_loop(runner):
    """Token for token, for every kind of question, with a joiner after 5 steps: left padding,
    features scattered at each row's offset, the 4-D step mask and the slots leak nothing."""
    rows = slot_rows(runner, QUESTIONS, steps=24, join_at=5)
    for conversation, row, joined in zip(QUESTIONS, rows, [0] * 5 + [5], strict=True):
        expected = model_greedy(runner, conversation, 25 - joined)
        assert until_stop(row, runner.stop_token_ids) == expected


def test_batched_replies_equal_solo_replies(runner, engines):
    solo = engines(runner, max_batch=1)
    alone = [solo.submit(c, GREEDY).result(timeout=60) for c in QUESTIONS]
    engine = engines(runner, started_now=False, max_batch=8)
    streams = [engine.submit(c, GREEDY) for c in QUESTIONS]
    engine.start()
    assert [s.result(timeout=60) for s in streams] == alone
    assert [s.stats.batch_size for s in streams] == [len(QUESTIONS)] * len(QUESTIONS)
    assert len(set(alone)) == len(alone), "each question got its own answer"


def test_six_concurrent_picture_questions_are_batched_and_answer_as_alone(v25_runner, engines):
    """The floor of issue 20: six picture questions at once share batches (seen >= 2) and each
    answer equals its solo answer."""
    pictures = ["scene.png", "chart.png", "receipt.png", "diagram.png", "favicon.png", "scene.png"]
    questions = [ask(f"Question {i}: what is here?", name) for i, name in enumerate(pictures)]
    params = SamplingParams(max_new_tokens=32, temperature=0.0)
    alone = [engines(v25_runner, max_batch=1).submit(q, params).result(timeout=60) for q in questions]
    gated = GatedRunner(v25_runner)
    engine = engines(gated, max_batch=8)
    first = engine.submit(questions[0], params)
    assert wait_until(lambda: engine.active_rows == 1, timeout=60)  # prefilled, held before its first step
    rest = [engine.submit(q, params) for q in questions[1:]]
    gated.allow_all()
    assert [s.result(timeout=60) for s in [first, *rest]] == alone
    assert gated.largest_batch == 6 and min(s.stats.batch_size for s in rest) >= 2


def test_a_request_joins_mid_generation(v25_runner, engines):
    long, short = QUESTIONS[0], QUESTIONS[1]
    long_params = SamplingParams(max_new_tokens=200, temperature=0.0)
    solo = engines(v25_runner, max_batch=1)
    expected = [solo.submit(long, long_params).result(timeout=60), solo.submit(short, GREEDY).result(timeout=60)]
    gated = GatedRunner(v25_runner)
    engine = engines(gated, max_batch=4)
    early = engine.submit(long, long_params)
    assert wait_until(lambda: engine.active_rows == 1, timeout=60)
    gated.allow(4)
    assert wait_until(lambda: gated.steps == 4, timeout=60)  # the fifth step waits: early is mid-answer
    late = engine.submit(short, GREEDY)
    gated.allow_all()
    assert [early.result(timeout=60), late.result(timeout=60)] == expected
    assert late.stats.batch_size == 2 and early.stats.batch_size == 2
    assert early.stats.tokens == 200, "the long answer ran to its limit (a test premise)"


def test_stop_frees_the_row_at_the_next_step(v25_runner, engines):
    gated = GatedRunner(v25_runner)
    engine = engines(gated, started_now=False, max_batch=2)
    params = SamplingParams(max_new_tokens=150, temperature=0.0)
    doomed, survivor = engine.submit(QUESTIONS[0], params), engine.submit(QUESTIONS[1], params)
    engine.start()
    assert wait_until(lambda: engine.active_rows == 2, timeout=60)
    doomed.cancel()
    gated.allow(1)
    assert wait_until(lambda: doomed.done, timeout=60)
    assert doomed.stats.finish_reason == FinishReason.CANCELLED and doomed.stats.tokens <= 2
    assert engine.active_rows == 1 and not survivor.done, "only the cancelled row left"
    newcomer = engine.submit(QUESTIONS[4], GREEDY)  # takes the freed slot of a batch of two
    gated.allow_all()
    assert newcomer.result(timeout=60) == engines(v25_runner, max_batch=1).submit(QUESTIONS[4], GREEDY).result(60)
    assert newcomer.stats.batch_size == 2
    assert survivor.result(timeout=60) and survivor.stats.finish_reason == FinishReason.LENGTH


def test_a_large_picture_is_sliced_and_the_slice_count_is_the_requests(v25_runner, engines):
    """max_slice_nums (the page's detail) shapes the slices, placeholders and vision features;
    downsample_mode (a 4.6 setting) changes nothing; rows with different counts share a batch."""
    runner = MiniCPMV2Runner(v25_runner.model, v25_runner.processor)  # caches of its own
    chart = asset_image("chart.png")
    settings = [PromptOptions(max_slice_nums=1), PromptOptions(max_slice_nums=2), PromptOptions(),
                PromptOptions(max_slice_nums=36)]
    chats = [Conversation(turns=(Turn("user", "Describe the chart.", images=(chart,)),), options=options)
             for options in settings]
    slices = [len(runner.encode(chat).image_bound) for chat in chats]
    assert slices[0] == 1 and slices[1] == 3 and slices[2] > 3, "whole only; whole + 2; the checkpoint's grid"
    assert slices[3] >= slices[2]
    fine = replace(chats[2], options=PromptOptions(downsample_mode="4x"))
    assert torch.equal(runner.encode(fine).input_ids, runner.encode(chats[2]).input_ids)
    alone = [engines(runner, max_batch=1).submit(chat, GREEDY).result(timeout=60) for chat in chats]
    engine = engines(runner, started_now=False, max_batch=4)
    streams = [engine.submit(chat, GREEDY) for chat in chats]
    engine.start()
    assert [s.result(timeout=60) for s in streams] == alone
    assert len(set(alone[:3])) == 3, "what the model saw differed"
    assert len({group.key for chat in chats for group in runner.encode(chat).groups}) == 4


def test_vision_features_are_cached_per_set_of_pictures_for_25_and_per_picture_for_26(runner):
    chat = QUESTIONS[2]  # two pictures
    prompt = runner.encode(chat)
    assert len(prompt.groups) == (2 if runner.per_picture_features else 1)
    assert runner.per_picture_features == (runner.processor.version >= 2.6)
    with torch.inference_mode():
        features = runner._features(prompt)
    assert features.shape[0] == len(prompt.image_bound)
    assert all(runner._vision_cache.get(group.key) is not None for group in prompt.groups)


def test_turn_lengths_never_undercount(runner):
    """What fitting a long chat relies on: the turns' lengths (a system prompt measured as a user
    turn, as the engine measures it) add up to at least the encoded prompt."""
    long_text = "The chart shows sales by month: the highest bar is in July. " * 5
    chats = [*QUESTIONS, replace(QUESTIONS[3], system_prompt=""),
             Conversation(turns=(Turn("user", long_text, images=tuple(asset_image(n) for n in ("chart.png",) * 12)),),
                          options=PromptOptions(max_slice_nums=4))]
    for chat in chats:
        counted = sum(runner.turn_length(turn, chat.options) for turn in chat.turns)
        if chat.system_prompt:
            counted += runner.turn_length(Turn("user", chat.system_prompt), chat.options)
        length = runner.encode(chat).length
        assert length <= counted <= length + 60 * (len(chat.turns) + 1)


def test_a_long_chat_keeps_its_newest_turns(v25_runner, engines):
    filler = "the picture shows a house by the sea with a red door and two windows " * 6
    history = tuple(Turn(role, filler, images=(asset_image("chart.png"),) if role == "user" and i == 0 else ())
                    for i in range(8) for role in ("user", "assistant"))
    chat = ask("And what about the door now?", "scene.png", history=history)
    engine = engines(v25_runner, max_batch=2, max_model_len=600)
    assert v25_runner.encode(chat).length > 600
    stream = engine.submit(chat, GREEDY)
    assert stream.result(timeout=60) and "left out" in stream.notices[0]
    fitted = fit_to_context(v25_runner, chat, GREEDY.max_new_tokens, 600)
    assert fitted.dropped_exchanges > 0 and fitted.prompt.length + GREEDY.max_new_tokens <= 600
    kept = v25_runner.tokenizer.decode(fitted.prompt.ids[-40:])
    assert "And what about the door now?" in kept, "the newest question is what the model reads last"
    assert stream.prompt_tokens == fitted.prompt.length


def test_int4_checkpoint_loads_and_answers_batched_as_alone(tiny_v25_int4_dir, engines):
    """The pre-quantized twin (nf4, double quant) computes in float16 as its release says."""
    loaded = load_model(Settings(model=str(tiny_v25_int4_dir)))
    assert loaded.quantization == "pre-quantized (bitsandbytes)" and loaded.dtype == "float16"
    runner = loaded.runner
    assert type(runner.model.llm.model.layers[0].mlp.down_proj).__name__ == "Linear4bit"
    assert runner.dtype == torch.float16
    alone = [engines(runner, max_batch=1).submit(c, GREEDY).result(timeout=60) for c in QUESTIONS[:3]]
    engine = engines(runner, started_now=False, max_batch=4)
    streams = [engine.submit(c, GREEDY) for c in QUESTIONS[:3]]
    engine.start()
    assert [s.result(timeout=60) for s in streams] == alone and all(alone)


def test_quant_int4_on_the_16_bit_checkpoint(tiny_v25_dir, engines):
    loaded = load_model(Settings(model=str(tiny_v25_dir), quant="int4"))
    model = loaded.runner.model
    assert type(model.llm.model.layers[0].self_attn.q_proj).__name__ == "Linear4bit"
    kept = [model.vpm.encoder.layers[0].mlp.fc1, model.resampler.kv_proj, model.llm.lm_head]
    assert all(type(module) is torch.nn.Linear for module in kept), "vision, resampler and head stay 16-bit"
    assert engines(loaded.runner, max_batch=2).submit(QUESTIONS[0], GREEDY).result(timeout=60)


def test_no_remote_code_is_needed_nor_run(tiny_v25_dir, tmp_path):
    """The checkpoint's own code files (which its config.json names) are never imported, and the
    flag that once allowed them is gone."""
    folder = tmp_path / "with-release-code"
    shutil.copytree(tiny_v25_dir, folder)
    for name in ("modeling_minicpmv.py", "configuration_minicpm.py", "tokenization_minicpmv_fast.py",
                 "processing_minicpmv.py", "image_processing_minicpmv.py", "resampler.py"):
        (folder / name).write_text("raise RuntimeError('remote code was run')\n")
    loaded = load_model(Settings(model=str(folder)))
    assert type(loaded.runner).__name__ == "MiniCPMV2Runner"
    assert loaded.sampling_defaults == CHAT_SAMPLING, "the page starts at the release's chat() settings"
    assert not loaded.thinks_by_default and loaded.runner.reasoning_tags is None
    assert not any(name.startswith("transformers_modules") for name in sys.modules)
    with pytest.raises(SystemExit):
        parse_settings(["--trust-remote-code"])


@pytest.mark.parametrize("version, message", [("4.5", "MiniCPM-V 4.5, which this demo does not serve"),
                                              (None, "MiniCPM-V of an unknown version")])
def test_other_minicpmv_versions_are_refused_in_one_line(tiny_v25_dir, tmp_path, version, message):
    folder = tmp_path / "other"
    shutil.copytree(tiny_v25_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    config.pop("version")
    if version:
        config["version"] = version
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match=message):
        load_model(Settings(model=str(folder)))


def test_videos_are_refused_with_a_clear_message(v25_runner, engines, tmp_path):
    assert v25_runner.reads_video is False
    folder = Path(upload_root()) / "test-v25-videos"
    folder.mkdir(parents=True, exist_ok=True)
    clip = make_clip(folder / "clip.mp4", seconds=1)
    service = ChatService(engines(v25_runner, started_now=False), Settings(), GpuMemory())
    with pytest.raises(InputError, match="clip.mp4: this model does not read videos; attach pictures instead."):
        service.submit({"text": "What happens?", "files": [str(clip)]}, [], GREEDY)
    video = prepare_video(clip, VideoLimits(), 4)
    with pytest.raises(ValueError, match="do not read videos"):
        v25_runner.encode(Conversation(turns=(Turn("user", "What happens?", videos=(video,)),)))


class PieceCounter(GatedRunner):
    """Counts the pieces of prefills done piece by piece."""

    pieces = 0

    def prefill_some(self, partial, tokens):
        self.pieces += 1
        return super().prefill_some(partial, tokens)


def test_a_long_prompt_prefilled_in_pieces_never_splits_a_picture(runner, engines):
    """A long chat that arrives while another row decodes is prefilled a piece at a time; the piece
    that reaches the pictures takes all of their placeholders and features: it answers as alone."""
    filler = "the picture shows a house by the sea with a red door and two windows " * 12
    history = (Turn("user", filler), Turn("assistant", filler),
               Turn("user", "Look.", images=(asset_image("chart.png"),)), Turn("assistant", "A chart."))
    chat = ask("And this one?", "receipt.png", history=history)
    prompt = runner.encode(chat)
    assert prompt.length > 600 and int(prompt.image_bound[0, 0]) > 256, "pictures start past the first piece"
    alone = engines(runner, max_batch=1).submit(chat, GREEDY).result(timeout=60)
    counter = PieceCounter(runner)
    engine = engines(counter, max_batch=2)
    busy = engine.submit(QUESTIONS[4], SamplingParams(max_new_tokens=100, temperature=0.0))
    assert wait_until(lambda: engine.active_rows == 1, timeout=60)
    late = engine.submit(chat, GREEDY)
    counter.allow_all()
    assert late.result(timeout=60) == alone
    assert counter.pieces >= 2 and late.stats.batch_size == 2
    busy.result(timeout=60)


class OutOfMemoryOnce(MiniCPMV2Runner):
    """Raises CUDA's out-of-memory error once, in the first decode step of more than `rows` rows."""

    def __init__(self, runner: MiniCPMV2Runner, rows: int) -> None:
        super().__init__(runner.model, runner.processor)
        self.rows, self.refusals = rows, 0

    def step(self, batch, tokens):
        if batch.size > self.rows and not self.refusals:
            self.refusals += 1
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return super().step(batch, tokens)


def test_out_of_memory_in_a_step_readmits_the_rows_which_go_on_exactly(v25_runner, engines):
    """The engine halves the batch and re-prefills each row from its prompt and the tokens it
    already streamed: the pictures' features land at the same places, the replies are unchanged."""
    alone = [engines(v25_runner, max_batch=1).submit(c, GREEDY).result(timeout=60) for c in QUESTIONS]
    runner = OutOfMemoryOnce(v25_runner, rows=2)
    engine = engines(runner, started_now=False, max_batch=8)
    streams = [engine.submit(c, GREEDY) for c in QUESTIONS]
    engine.start()
    assert [s.result(timeout=60) for s in streams] == alone
    assert runner.refusals == 1 and engine.scheduler.ceiling < 8


def test_one_call_batches_of_zerogpu_answer_as_alone(v25_runner, engines):
    """ZeroGPU's path (no slots: a transformers cache, rows leave by index) with the 2.5 runner."""
    from minicpmv_demo.engine.one_call import decode_batch

    alone = [engines(v25_runner, max_batch=1).submit(c, GREEDY).result(timeout=60) for c in QUESTIONS]
    engine = engines(v25_runner, started_now=False, max_batch=8, batch_call=decode_batch)
    streams = [engine.submit(c, GREEDY) for c in QUESTIONS]
    short = engine.submit(QUESTIONS[0], SamplingParams(max_new_tokens=3, temperature=0.0))
    engine.start()
    assert [s.result(timeout=60) for s in streams] == alone
    assert short.result(timeout=60) and short.stats.tokens == 3
    assert streams[0].stats.batch_size == len(QUESTIONS) + 1
