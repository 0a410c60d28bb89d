"""The OpenAI fields besides messages and sampling, against a real server on the tiny model: each
is done (`stop`, `model` and its aliases) or refused by name (tools, JSON formats, n > 1), never
accepted and ignored; malformed bodies are 400s."""

from __future__ import annotations

import json
from dataclasses import replace

import httpx
import pytest

from conftest import launch_app

openai = pytest.importorskip("openai")
QUESTION = [{"role": "user", "content": "Tell me a long story about the sea."}]


@pytest.fixture(scope="module")
def served(tiny_settings, loaded_tiny):
    app, url = launch_app(replace(tiny_settings, cache_size=0, max_new_tokens=1024,
                                  model_aliases="minicpm-v, gpt-4o-mini"), loaded_tiny)
    yield app, url
    app.close()


@pytest.fixture(scope="module")
def client(served):
    return openai.OpenAI(base_url=f"{served[1]}v1", api_key="none", max_retries=0)


def post(url: str, **fields) -> httpx.Response:
    return httpx.post(f"{url}v1/chat/completions", json={"messages": QUESTION, "max_tokens": 8, **fields}, timeout=60)


def greedy(client, max_tokens: int = 48, **extra):
    return client.chat.completions.create(model="tiny", messages=QUESTION, max_tokens=max_tokens, temperature=0,
                                          **extra)


def streamed(url: str, **fields) -> tuple[list[str], str]:
    """The content pieces of a streamed greedy reply, and its finish reason."""
    body = {"model": "tiny", "messages": QUESTION, "temperature": 0, "stream": True, **fields}
    pieces, finish = [], None
    with httpx.stream("POST", f"{url}v1/chat/completions", json=body, timeout=60) as response:
        for line in response.iter_lines():
            if not line.startswith("data: {"):
                continue
            choices = json.loads(line.removeprefix("data: "))["choices"]
            if choices:
                pieces.append(choices[0]["delta"].get("content") or "")
                finish = choices[0]["finish_reason"] or finish
    return pieces, finish


@pytest.mark.parametrize("field, value", [
    ("logprobs", True),
    ("top_logprobs", 3),
    ("tools", [{"type": "function", "function": {"name": "f", "parameters": {}}}]),
    ("tool_choice", "required"),
    ("functions", [{"name": "f"}]),
    ("response_format", {"type": "json_object"}),
    ("response_format", {"type": "json_schema", "json_schema": {"name": "s", "schema": {}}}),
    ("n", 2),
])
def test_what_the_server_does_not_do_is_refused_by_name(served, field, value):
    refused = post(served[1], **{field: value})
    assert refused.status_code == 400
    error = refused.json()["error"]
    assert error["param"] == field and f"'{field}'" in error["message"]


def test_fields_that_ask_nothing_are_accepted(served):
    answered = post(served[1], tools=[], tool_choice="none", response_format={"type": "text"}, n=1, logprobs=False,
                    top_logprobs=0)
    assert answered.status_code == 200 and answered.json()["choices"][0]["message"]["content"] is not None


def test_an_unknown_model_is_404_and_the_served_name_and_aliases_are_listed(served, client):
    assert [model.id for model in client.models.list()] == ["tiny", "minicpm-v", "gpt-4o-mini"]
    with pytest.raises(openai.NotFoundError, match="does not exist") as missing:
        client.chat.completions.create(model="gpt-5-turbo", messages=QUESTION, max_tokens=4)
    assert missing.value.body["code"] == "model_not_found" and missing.value.body["param"] == "model"
    for name in ("tiny", "minicpm-v", "gpt-4o-mini"):
        reply = client.chat.completions.create(model=name, messages=QUESTION, max_tokens=4, temperature=0)
        assert reply.model == "tiny", "replies name the served model"
    assert post(served[1]).status_code == 200, "no model named: the one served"


@pytest.mark.parametrize("body", ["[" * 100_000, '{"messages": ' + "[" * 5_000 + "]" * 5_000 + "}"])
def test_json_nested_too_deeply_is_a_400(served, body):
    refused = httpx.post(f"{served[1]}v1/chat/completions", content=body, timeout=30,
                         headers={"content-type": "application/json"})
    assert refused.status_code == 400 and "nested too deeply" in refused.json()["error"]["message"]


def test_a_reply_ends_before_its_stop_string_which_is_never_sent(served, client):
    full = greedy(client).choices[0].message.content
    assert len(full) > 12, full
    stop = full[6:9]  # a piece of the middle of the reply: it ends before the first place it occurs
    expected = full[:full.index(stop)]
    cut = greedy(client, stop=[stop, "never said by the model"])
    assert cut.choices[0].message.content == expected and cut.choices[0].finish_reason == "stop"
    pieces, finish = streamed(served[1], max_tokens=48, stop=stop)
    assert "".join(pieces) == expected and finish == "stop"
    assert not any(stop in piece for piece in pieces)
    assert greedy(client, stop=full[:2]).choices[0].message.content == "", "a stop at the very start"


def test_text_held_back_for_a_stop_string_that_does_not_follow_is_sent(served, client):
    full = greedy(client).choices[0].message.content
    almost = full[-3:] + "\u2603"  # the reply's end, then what the model never says
    pieces, finish = streamed(served[1], max_tokens=48, stop=almost)
    assert "".join(pieces) == full and finish == "length"
    assert greedy(client, stop=almost).choices[0].message.content == full


def test_the_rest_of_a_stopped_reply_is_not_generated(served, client):
    """The engine drops the row at the stop: far fewer tokens than asked for are generated."""
    full = greedy(client).choices[0].message.content
    cut = greedy(client, max_tokens=1024, stop=full[6:9])
    assert cut.usage.completion_tokens < 1024


@pytest.mark.parametrize("stop", [5, ["a", 5], [""], ["a"] * 5, "x" * 300, {"a": 1}])
def test_bad_stop_values_are_refused(served, stop):
    refused = post(served[1], stop=stop)
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "stop"


def test_the_same_seed_gives_the_same_sampled_reply(client):
    def sampled(seed: int) -> str:
        return client.chat.completions.create(model="tiny", messages=QUESTION, max_tokens=24, temperature=1.0,
                                              seed=seed).choices[0].message.content

    first = sampled(11)
    assert sampled(11) == first and sampled(12) != first


@pytest.mark.parametrize("seed", ["7", 1.5, True, 2**64])
def test_bad_seeds_are_refused(served, seed):
    refused = post(served[1], seed=seed)
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "seed"


def test_a_prompt_longer_than_the_context_is_a_400_with_its_length(tiny_settings, loaded_tiny):
    """Not a 500: the openai SDK retries those, and a request that cannot fit never will."""
    app, url = launch_app(replace(tiny_settings, cache_size=0, max_model_len=256), loaded_tiny)
    long = [{"role": "user", "content": "the sea and the sky " * 200}]
    try:
        client = openai.OpenAI(base_url=f"{url}v1", api_key="none", max_retries=0)
        for stream in (False, True):
            with pytest.raises(openai.BadRequestError, match=r"too long for the model \(\d+ tokens; the model "
                                                             r"reads at most 256\)"):
                client.chat.completions.create(model="tiny", messages=long, max_tokens=8, stream=stream)
    finally:
        app.close()


def test_a_lone_surrogate_in_the_text_is_answered_not_a_500(served):
    """JSON may carry "\\ud800", which no tokenizer takes: it is read as U+FFFD."""
    body = '{"messages": [{"role": "user", "content": "\\ud800 hi"}], "max_tokens": 4}'
    answered = httpx.post(f"{served[1]}v1/chat/completions", content=body, timeout=60,
                          headers={"content-type": "application/json"})
    assert answered.status_code == 200, answered.text
