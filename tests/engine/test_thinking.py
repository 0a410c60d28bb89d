"""Thinking on the tiny model: the Qwen3.5-style template switch, the reply's reasoning, the
reasoning budget, reasoning never going back to the model, and the OpenAI route's
`reasoning_content`, `chat_template_kwargs` and `usage`."""

from __future__ import annotations

import json
from dataclasses import replace

import httpx
import pytest
import torch

from conftest import launch_app
from minicpmv_demo.intake.message import InputRules, build_conversation
from minicpmv_demo.intake.conversation import Conversation, PromptOptions, Turn
from minicpmv_demo.engine import SamplingParams
from minicpmv_demo.engine.reasoning_budget import ReasoningBudget, ReasoningTags, thinking_limit
from minicpmv_demo.intake.images import ImageLimits
from minicpmv_demo.model.loading import thinks_by_default
from minicpmv_demo.model.minicpmv4.runner import MiniCPMV4Runner
from minicpmv_demo.engine.reasoning import THINK_CLOSE, THINK_OPEN, split_reasoning
from minicpmv_demo.config.settings import parse_settings

openai = pytest.importorskip("openai")

THINK = PromptOptions(enable_thinking=True)
NO_THINK = PromptOptions(enable_thinking=False)


def chat(text: str, options: PromptOptions = PromptOptions(), history: tuple[Turn, ...] = ()) -> Conversation:
    return Conversation(turns=(*history, Turn("user", text)), options=options)


def generate(runner: MiniCPMV4Runner, ids: list[int], new: int) -> list[int]:
    """Greedy `model.generate` from raw ids: the ground truth the engine's rows must follow."""
    with torch.inference_mode():
        out = runner.model.generate(input_ids=torch.tensor([ids]), attention_mask=torch.ones((1, len(ids)),
                                    dtype=torch.long), max_new_tokens=new, do_sample=False)
    return out[0, len(ids):].tolist()


# -- the template and the prompt --------------------------------------------------------------

def test_the_switch_renders_an_open_or_an_empty_closed_block(loaded_tiny):
    runner = loaded_tiny.runner
    assert runner.render(chat("what is it", THINK)).endswith("<|im_start|>assistant\n<think>\n")
    assert runner.render(chat("what is it", NO_THINK)).endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert runner.encode(chat("what is it", THINK)).thinking
    assert not runner.encode(chat("what is it", NO_THINK)).thinking
    # The tags are one token each, and ordinary tokens: decoding for display keeps them.
    tags = runner.reasoning_tags
    assert runner.tokenizer.convert_tokens_to_ids([THINK_OPEN, THINK_CLOSE]) == [tags.open_id, tags.close_id]
    ids = runner.encode(chat("what is it", NO_THINK)).inputs["input_ids"][0].tolist()
    assert ids[-2:] == [tags.open_id, tags.close_id]
    assert runner.tokenizer.decode(ids[-3:], skip_special_tokens=True) == "assistant <think> </think>"


def test_the_checkpoint_default_applies_when_a_request_does_not_choose(loaded_tiny):
    instruct = loaded_tiny.runner
    thinking = MiniCPMV4Runner(instruct.model, instruct.processor, thinks_by_default=True)
    assert not loaded_tiny.thinks_by_default and not instruct.encode(chat("what")).thinking
    assert thinking.encode(chat("what")).thinking
    assert not thinking.encode(chat("what", NO_THINK)).thinking, "a request's choice wins over the default"
    assert thinks_by_default("auto", "openbmb/MiniCPM-V-4.6-Thinking")
    assert thinks_by_default("auto", "/hub/models--openbmb--MiniCPM-V-4.6-Thinking-BNB/snapshots/0a1b")
    assert not thinks_by_default("auto", "openbmb/MiniCPM-V-4.6")
    assert thinks_by_default("on", "openbmb/MiniCPM-V-4.6") and not thinks_by_default("off", "x-Thinking")


def test_settings_for_thinking(capsys):
    settings = parse_settings(["--max-thinking-tokens", "64"], environ={"MINICPMV_DEFAULT_THINKING": "on"})
    assert (settings.max_thinking_tokens, settings.default_thinking) == (64, "on")
    assert parse_settings([], environ={}).max_thinking_tokens == 2048
    with pytest.raises(SystemExit):
        parse_settings(["--max-thinking-tokens", "-1"], environ={})
    assert "--max-thinking-tokens must be 0" in capsys.readouterr().err


def test_earlier_reasoning_never_goes_back_to_the_model(loaded_tiny):
    runner = loaded_tiny.runner
    said = "<think>\nred sky above the house\n</think>\n\nblue"
    # The template drops it even when a turn still holds it ...
    text = runner.render(chat("and now", THINK, history=(Turn("user", "what"), Turn("assistant", said))))
    assert "red sky" not in text and "<|im_start|>assistant\nblue<|im_end|>" in text
    # ... and the conversation builder never hands it over: the page's and the API's history.
    rules = InputRules(image_limits=ImageLimits(), max_images=4, allowed_roots=())
    history = [{"role": "user", "content": "what"}, {"role": "assistant", "content": said},
               {"role": "user", "content": "and"}, {"role": "assistant", "content": "<think>cut while reasoning"}]
    conversation, _ = build_conversation("and now", history, system_prompt="", rules=rules)
    assert [turn.text for turn in conversation.turns] == ["what", "blue", "and", "", "and now"]


# -- the engine -------------------------------------------------------------------------------

def test_a_thinking_reply_streams_reasoning_then_its_answer(make_engine, loaded_tiny):
    engine = make_engine(max_thinking_tokens=0)  # no cap: the reply is the model's own
    stream = engine.submit(chat("what is in the picture", THINK), SamplingParams(max_new_tokens=40))
    text = stream.result(timeout=60)
    assert stream.thinking and stream.prompt_tokens == loaded_tiny.runner.encode(chat("what is in the picture",
                                                                                      THINK)).length
    parts = split_reasoning(text, stream.thinking)
    assert parts.reasoning, "the reply starts as reasoning"
    plain = engine.submit(chat("what is in the picture", NO_THINK), SamplingParams(max_new_tokens=40))
    plain.result(timeout=60)
    assert not plain.thinking and split_reasoning(plain.text, plain.thinking).reasoning is None


def test_the_budget_forces_the_close_tag_and_says_so(make_engine, loaded_tiny):
    runner, budget = loaded_tiny.runner, 6
    conversation = chat("what is in the picture", THINK)
    prompt = runner.encode(conversation).inputs["input_ids"][0].tolist()
    free = generate(runner, prompt, 30)
    tags = runner.reasoning_tags
    assert not {tags.open_id, tags.close_id} & set(free[:budget]), "the model reasons on: the budget must cut it"
    stream = make_engine(max_thinking_tokens=budget).submit(conversation, SamplingParams(max_new_tokens=30))
    text = stream.result(timeout=60)
    assert stream.notices == [f"Reasoning was cut at {budget} tokens (the server's limit) so that the model answers."]
    # Exactly: `budget` tokens of the model's own reasoning, then `</think>`, then what the model
    # writes after that close tag (the forced token really reached the model).
    forced = free[:budget] + [tags.close_id]
    expected = forced + generate(runner, prompt + forced, 30 - len(forced))
    eos = runner.tokenizer.eos_token_id
    expected = expected[:expected.index(eos)] if eos in expected else expected
    assert text == runner.tokenizer.decode(expected, skip_special_tokens=True)
    parts = split_reasoning(text, stream.thinking)
    assert parts.reasoning_done and parts.reasoning == runner.tokenizer.decode(free[:budget], skip_special_tokens=True)


def test_budget_rules():
    assert thinking_limit(2048, 512) == 384, "the answer keeps a quarter of the reply's tokens"
    assert thinking_limit(100, 4096) == 100 and thinking_limit(0, 512) == 0 and thinking_limit(50, 1) == 1
    budget = ReasoningBudget(ReasoningTags(open_id=1, close_id=2), limit=2, opened_in_prompt=False)
    assert [budget.steer(t)[0] for t in (7, 1, 7, 7, 7, 7)] == [7, 1, 7, 7, 2, 7], "a block the model opens counts"
    assert budget.spent == 2 and not budget.inside


def test_thinking_and_plain_requests_share_a_batch(make_engine):
    questions = [chat("what is in the picture", THINK), chat("read the total", NO_THINK)]
    params = SamplingParams(max_new_tokens=24)
    solo = make_engine(max_batch=1, max_thinking_tokens=8)
    expected = [solo.submit(q, params).result(timeout=60) for q in questions]
    solo.shutdown()
    engine = make_engine(started=False, max_batch=4, max_thinking_tokens=8)
    streams = [engine.submit(q, params) for q in questions]
    engine.start()
    assert [s.result(timeout=60) for s in streams] == expected
    assert [s.stats.batch_size for s in streams] == [2, 2]
    thinking, plain = (split_reasoning(s.text, s.thinking) for s in streams)
    assert thinking.reasoning and thinking.reasoning_done and thinking.answer, "reasoned, then answered"
    assert plain.reasoning is None and plain.answer


def test_a_cached_reply_keeps_its_reasoning_and_sizes(make_engine):
    engine = make_engine(cache_size=8, max_thinking_tokens=8)
    first = engine.submit(chat("what is in the picture", THINK), SamplingParams(max_new_tokens=20))
    first.result(timeout=60)
    again = engine.submit(chat("what is in the picture", THINK), SamplingParams(max_new_tokens=20))
    assert again.result(timeout=5) == first.text and again.stats.from_cache
    assert (again.thinking, again.prompt_tokens, again.stats.tokens) == (True, first.prompt_tokens,
                                                                         first.stats.tokens)


# -- the OpenAI route -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def api(tiny_settings, loaded_tiny):
    app, url = launch_app(replace(tiny_settings, cache_size=0, max_thinking_tokens=8), loaded_tiny)
    yield openai.OpenAI(base_url=f"{url}v1", api_key="none", max_retries=0), url, loaded_tiny.runner
    app.close()


def ask(client, thinking: bool | None, **extra):
    body = {} if thinking is None else {"chat_template_kwargs": {"enable_thinking": thinking}}
    return client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "what is it"}],
                                          max_tokens=20, temperature=0, extra_body=body, **extra)


def test_api_reasoning_content_and_usage(api):
    client, _, runner = api
    done = ask(client, True)
    message, usage = done.choices[0].message, done.usage
    assert message.model_extra["reasoning_content"] and message.content
    prompt = runner.encode(chat("what is it", THINK))
    assert usage.prompt_tokens == prompt.length
    generated = generate(runner, prompt.inputs["input_ids"][0].tolist(), 8)  # the reasoning, up to the cut
    assert message.model_extra["reasoning_content"] == runner.tokenizer.decode(generated, skip_special_tokens=True)
    assert usage.completion_tokens == (20 if done.choices[0].finish_reason == "length" else usage.completion_tokens)
    assert 8 < usage.completion_tokens <= 20 and usage.total_tokens == prompt.length + usage.completion_tokens
    plain = ask(client, False)
    assert plain.choices[0].message.model_extra["reasoning_content"] is None and plain.choices[0].message.content
    assert plain.usage.prompt_tokens == runner.encode(chat("what is it", NO_THINK)).length
    assert ask(client, None).choices[0].message.content == plain.choices[0].message.content, "tiny: off by default"


def test_api_streams_reasoning_and_answer_apart_with_usage_last(api):
    client, _, _ = api
    done = ask(client, True)
    chunks = list(ask(client, True, stream=True, stream_options={"include_usage": True}))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    reasoning = [d.model_extra.get("reasoning_content") for d in deltas if d.model_extra.get("reasoning_content")]
    answer = [d.content for d in deltas if d.content]
    assert all(not (d.content and d.model_extra.get("reasoning_content")) for d in deltas), "one or the other"
    assert len(reasoning) >= 1 and "".join(reasoning) == done.choices[0].message.model_extra["reasoning_content"]
    assert "".join(answer) == done.choices[0].message.content
    assert chunks[-1].choices == [] and chunks[-1].usage.model_dump() == done.usage.model_dump()
    assert all(c.usage is None for c in chunks[:-1])
    without = list(ask(client, True, stream=True))
    assert all(c.choices for c in without), "usage is sent in a stream only when asked for"


def test_api_never_sends_reasoning_back(api):
    client, _, _ = api

    def follow_up(assistant: dict):
        return client.chat.completions.create(model="tiny", max_tokens=6, temperature=0, messages=[
            {"role": "user", "content": "what is it"}, {"role": "assistant", **assistant},
            {"role": "user", "content": "and the sky"}])

    clean = follow_up({"content": "a blue house"})
    for sent_back in ({"content": "<think>\nred sky and green grass\n</think>\n\na blue house"},
                      {"content": "a blue house", "reasoning_content": "red sky and green grass"}):
        echoed = follow_up(sent_back)
        assert echoed.usage.prompt_tokens == clean.usage.prompt_tokens
        assert echoed.choices[0].message.content == clean.choices[0].message.content


@pytest.mark.parametrize("body", [{"chat_template_kwargs": {"enable_thinking": "yes"}},
                                  {"chat_template_kwargs": "enable_thinking"},
                                  {"stream_options": {"include_usage": "yes"}}])
def test_api_refuses_bad_reasoning_switches(api, body):
    _, url, _ = api
    reply = httpx.post(f"{url}v1/chat/completions", timeout=30, content=json.dumps(
        {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], **body}))
    assert reply.status_code == 400 and "must" in reply.json()["error"]["message"]
