"""vLLM-only and less common OpenAI fields must reach vLLM untouched (passed with the SDK's extra_body)."""

import json
import re

from tests.integration.support import CHAT_MODEL

MODEL = f"vllm/{CHAT_MODEL}"
MESSAGES = [{"role": "user", "content": "Describe the weather in Paris."}]

SCHEMA = {
    "type": "object",
    "properties": {
        # A pattern, not just maxLength: the tiny model's byte-level vocabulary would
        # otherwise put raw control characters (invalid in JSON strings) into the value.
        "city": {"type": "string", "pattern": "^[a-z]{1,16}$"},
        "n": {"type": "integer", "minimum": 0, "maximum": 999},
    },
    "required": ["city", "n"],
    "additionalProperties": False,
}


def _assert_matches_schema(content):
    value = json.loads(content)
    assert set(value) == {"city", "n"}, value
    assert isinstance(value["city"], str) and re.fullmatch("[a-z]{1,16}", value["city"]), value
    assert isinstance(value["n"], int) and 0 <= value["n"] <= 999, value


def test_top_k_reaches_vllm(client, direct):
    """top_k=1 is greedy even at temperature 1: gateway and vLLM must then say exactly the same.

    Were top_k dropped, the gateway's answer would be sampled at temperature 1 and differ.
    """
    kw = dict(messages=MESSAGES, max_tokens=16, temperature=1.0, extra_body={"top_k": 1, "ignore_eos": True})
    via = [client.chat.completions.create(model=MODEL, **kw).choices[0].message.content for _ in range(2)]
    straight = direct.chat.completions.create(model=CHAT_MODEL, **kw).choices[0].message.content
    assert via[0] == via[1] == straight


def test_structured_outputs_json(client):
    r = client.chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=64, extra_body={"structured_outputs": {"json": SCHEMA}})
    choice = r.choices[0]
    assert choice.finish_reason == "stop", choice
    _assert_matches_schema(choice.message.content)


def test_structured_outputs_choice(client):
    r = client.chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=8,
        extra_body={"structured_outputs": {"choice": ["sunny", "rainy"]}})
    assert r.choices[0].message.content in ("sunny", "rainy")


def test_response_format_json_schema(client):
    r = client.chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=64,
        response_format={"type": "json_schema", "json_schema": {"name": "weather", "schema": SCHEMA, "strict": True}})
    choice = r.choices[0]
    assert choice.finish_reason == "stop", choice
    _assert_matches_schema(choice.message.content)


def test_logprobs_and_top_logprobs(client):
    r = client.chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=4, logprobs=True, top_logprobs=3,
        extra_body={"ignore_eos": True})
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens == 4
    for token in content:
        assert token.logprob <= 0.0
        assert len(token.top_logprobs) == 3


def test_n_two_choices(client):
    r = client.chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=4, n=2, extra_body={"ignore_eos": True})
    assert sorted(c.index for c in r.choices) == [0, 1]
    assert r.usage.completion_tokens == 8


def test_n_two_choices_streamed(client):
    chunks = list(client.chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=3, n=2, stream=True, extra_body={"ignore_eos": True}))
    finished = {c.choices[0].index for c in chunks if c.choices and c.choices[0].finish_reason}
    assert finished == {0, 1}


def test_named_tool_choice_with_a_strict_function(client):
    tools = [{
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Current weather for a city.",
            "strict": True,
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string", "pattern": "^[a-z]{1,12}$"}},
                "required": ["city"],
                "additionalProperties": False,
            },
        },
    }]
    r = client.chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=64, tools=tools,
        tool_choice={"type": "function", "function": {"name": "get_weather"}})
    message = r.choices[0].message
    assert message.tool_calls, message
    call = message.tool_calls[0]
    assert call.type == "function"
    assert call.function.name == "get_weather"
    args = json.loads(call.function.arguments)
    assert set(args) == {"city"} and re.fullmatch("[a-z]{1,12}", args["city"]), args


def test_vllm_sampling_extras_are_accepted(client):
    """A handful of vLLM-only sampling fields; vLLM would 400 on a wrong type, so they arrived intact."""
    r = client.chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=4,
        extra_body={"min_p": 0.05, "repetition_penalty": 1.1, "min_tokens": 4, "ignore_eos": True,
                    "skip_special_tokens": False})
    assert r.usage.completion_tokens == 4


def test_min_tokens_validated_by_vllm(client):
    """min_tokens > max_tokens is rejected by vLLM itself: proof the field went through."""
    import openai
    import pytest

    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=2, extra_body={"min_tokens": 5})
    assert "min_tokens" in info.value.response.json()["error"]["message"]
