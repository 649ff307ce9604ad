"""Chat completions through the gateway, compared with the same request sent to vLLM directly."""

import json

from tests.integration.support import CHAT_MODEL, request, stream_chunks

MODEL = f"vllm/{CHAT_MODEL}"
MESSAGES = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Name three prime numbers."},
]


def _both(gateway, vllm, body):
    """The same body to the gateway (as MODEL) and to vLLM (as its own id)."""
    via = request("POST", gateway.url + "/chat/completions", dict(body, model=MODEL), headers=gateway.auth)
    direct = request("POST", vllm.chat_url + "/chat/completions", dict(body, model=CHAT_MODEL))
    return via, direct


def test_chat_with_the_sdk(client, direct):
    r = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=8)
    assert r.object == "chat.completion"
    assert r.id.startswith("chatcmpl-")
    assert len(r.choices) == 1
    choice = r.choices[0]
    assert choice.index == 0
    assert choice.message.role == "assistant"
    assert isinstance(choice.message.content, str)
    assert choice.finish_reason in ("length", "stop")
    d = direct.chat.completions.create(model=CHAT_MODEL, messages=MESSAGES, max_tokens=8)
    assert r.usage.prompt_tokens == d.usage.prompt_tokens
    assert 0 < r.usage.completion_tokens <= 8
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_chat_body_has_vllms_shape(gateway, vllm):
    """Relayed byte for byte: same keys (vLLM's extras included) and the upstream's own model id."""
    via, direct = _both(gateway, vllm, {"messages": MESSAGES, "max_tokens": 6, "ignore_eos": True})
    assert via.status == direct.status == 200, (via, direct)
    assert via.headers["content-type"].startswith("application/json")
    a, b = via.json(), direct.json()
    assert set(a) == set(b)
    assert set(a["choices"][0]) == set(b["choices"][0])
    assert set(a["choices"][0]["message"]) == set(b["choices"][0]["message"])
    assert a["model"] == CHAT_MODEL
    assert a["system_fingerprint"] == b["system_fingerprint"]
    assert a["usage"]["prompt_tokens"] == b["usage"]["prompt_tokens"]
    assert a["usage"]["completion_tokens"] == b["usage"]["completion_tokens"] == 6


def _assert_complete_stream(raw, max_tokens):
    chunks, done = stream_chunks(raw)
    assert done, "stream did not end with data: [DONE]"
    content_chunks = [c for c in chunks if c.get("choices")]
    assert content_chunks, chunks
    assert len({c["id"] for c in chunks}) == 1
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert content_chunks[0]["choices"][0]["delta"].get("role") == "assistant"
    finished = [c for c in content_chunks if c["choices"][0].get("finish_reason")]
    assert len(finished) == 1 and finished[0] is content_chunks[-1], "finish_reason must be on the last choice chunk"
    assert finished[0]["choices"][0]["finish_reason"] == "length"
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in content_chunks)
    return chunks, text


def test_stream_without_include_usage_has_no_usage_chunk(gateway, vllm):
    body = {"model": MODEL, "messages": MESSAGES, "max_tokens": 5, "ignore_eos": True, "stream": True}
    resp = request("POST", gateway.url + "/chat/completions", body, headers=gateway.auth)
    assert resp.status == 200, resp
    assert resp.headers["content-type"].startswith("text/event-stream")
    chunks, _ = _assert_complete_stream(resp.body, 5)
    with_usage = [c for c in chunks if c.get("usage")]
    assert not with_usage, f"usage leaked to a client that did not ask for it: {with_usage}"
    assert all(c.get("choices") for c in chunks), "a chunk with empty choices (the forced usage chunk?)"


def test_stream_with_include_usage_has_exactly_one_final_usage_chunk(gateway, vllm):
    body = {"messages": MESSAGES, "max_tokens": 5, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}
    via, direct = _both(gateway, vllm, body)
    assert via.status == direct.status == 200, (via, direct)
    chunks, _ = _assert_complete_stream(via.body, 5)
    usage_chunks = [c for c in chunks if c.get("usage")]
    assert len(usage_chunks) == 1, usage_chunks
    assert usage_chunks[0] is chunks[-1], "the usage chunk must be the last before [DONE]"
    assert usage_chunks[0]["choices"] == []
    direct_chunks, direct_done = stream_chunks(direct.body)
    assert direct_done
    expected = direct_chunks[-1]["usage"]
    got = usage_chunks[0]["usage"]
    assert got["prompt_tokens"] == expected["prompt_tokens"]
    assert got["completion_tokens"] == expected["completion_tokens"] == 5
    assert got["total_tokens"] == got["prompt_tokens"] + 5


def test_stream_with_the_sdk(client):
    plain = list(client.chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=4, stream=True, extra_body={"ignore_eos": True}))
    assert plain and all(c.usage is None for c in plain)
    assert plain[-1].choices[0].finish_reason == "length"

    counted = list(client.chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=4, stream=True,
        stream_options={"include_usage": True}, extra_body={"ignore_eos": True}))
    assert [c for c in counted if c.usage] == [counted[-1]]
    assert counted[-1].choices == []
    assert counted[-1].usage.completion_tokens == 4
    assert counted[-2].choices[0].finish_reason == "length"


def test_multi_turn_with_tool_result(client, direct):
    """A conversation with an assistant tool call and a tool answer renders and counts the same."""
    messages = MESSAGES + [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "primes", "arguments": json.dumps({"n": 3})}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "2, 3, 5"},
    ]
    r = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=4)
    d = direct.chat.completions.create(model=CHAT_MODEL, messages=messages, max_tokens=4)
    assert r.usage.prompt_tokens == d.usage.prompt_tokens
