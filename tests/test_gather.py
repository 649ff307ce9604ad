"""Whole answers made of event streams nobody asked for (L{gomodel.proxy.gather})."""

import json

import pytest

from gomodel.proxy import gather
from gomodel.proxy.sse import StreamIncomplete


def sse(*payloads, done=True) -> bytes:
    events = [b"data: " + json.dumps(p).encode() for p in payloads] + ([b"data: [DONE]"] if done else [])
    return b"\n\n".join(events) + b"\n\n"


def chunk(index, delta, finish=None, **extra):
    return {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "m",
            "choices": [{"index": index, "delta": delta, "finish_reason": finish, **extra}]}


def test_a_chat_stream_of_two_choices_with_tool_calls_logprobs_and_usage_is_one_completion():
    token = {"token": "a", "logprob": -0.1, "bytes": [97], "top_logprobs": []}
    body = sse(chunk(0, {"role": "assistant", "content": ""}), chunk(1, {"role": "assistant", "content": "x"}),
               chunk(0, {"content": "a"}, logprobs={"content": [token], "refusal": None}),
               chunk(0, {"content": "b"}, logprobs={"content": [dict(token, token="b")], "refusal": None}),
               chunk(1, {"tool_calls": [{"index": 1, "id": "t2", "type": "function",
                                         "function": {"name": "g", "arguments": "{"}}]}),
               chunk(1, {"tool_calls": [{"index": 0, "id": "t1", "type": "function",
                                         "function": {"name": "f", "arguments": ""}}]}),
               chunk(1, {"tool_calls": [{"index": 1, "function": {"arguments": "}"}}]}, "tool_calls"),
               chunk(0, {"refusal": "no"}, "stop", stop_reason=None),
               {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "m", "choices": [],
                "usage": {"prompt_tokens": 2, "completion_tokens": 3, "total_tokens": 5}})
    whole = json.loads(gather.whole_completion(body))
    assert whole["object"] == "chat.completion" and whole["usage"]["total_tokens"] == 5
    first, second = whole["choices"]
    assert first["message"] == {"role": "assistant", "content": "ab", "refusal": "no"}
    assert [t["token"] for t in first["logprobs"]["content"]] == ["a", "b"] and first["finish_reason"] == "stop"
    assert second["message"]["tool_calls"] == [
        {"id": "t1", "type": "function", "function": {"name": "f", "arguments": ""}},
        {"id": "t2", "type": "function", "function": {"name": "g", "arguments": "{}"}}]
    assert second["message"]["content"] == "x" and second["finish_reason"] == "tool_calls"


def test_tool_calls_sharing_one_index_are_each_their_own_call():
    # Ollama and Grok stream every call of a turn at index 0: a new id there is a new call (before: glued into one).
    def call(call_id, arguments):
        part = {"index": 0, "function": {"arguments": arguments}}
        if call_id:
            part.update(id=call_id, type="function")
            part["function"]["name"] = "f"
        return chunk(0, {"tool_calls": [part]})

    body = sse(call("a", '{"x": '), call(None, "1}"), call("b", ""), call(None, '{"x": 2}'), call("b", ""))
    calls = json.loads(gather.whole_completion(body))["choices"][0]["message"]["tool_calls"]
    assert [(c["id"], c["function"]["arguments"]) for c in calls] == [("a", '{"x": 1}'), ("b", '{"x": 2}')]
    # A fragment that names no function goes on with its call, whatever id a server puts on it.
    fragment = {"index": 0, "id": "z", "function": {"arguments": "1}"}}
    body = sse(call("a", '{"x": '), chunk(0, {"tool_calls": [fragment]}))
    calls = json.loads(gather.whole_completion(body))["choices"][0]["message"]["tool_calls"]
    assert [(c["function"]["name"], c["function"]["arguments"]) for c in calls] == [("f", '{"x": 1}')]


def test_a_text_completion_stream_is_one_text_completion():
    def part(text, finish=None):
        return {"id": "cmpl", "object": "text_completion", "created": 1, "model": "m", "choices": [
            {"index": 0, "text": text, "finish_reason": finish,
             "logprobs": {"tokens": [text], "token_logprobs": [-1.0], "top_logprobs": [None], "text_offset": [0]}}]}

    whole = json.loads(gather.whole_completion(sse(part("he"), part("llo", "length"))))
    [choice] = whole["choices"]
    assert whole["object"] == "text_completion" and choice["text"] == "hello" and choice["finish_reason"] == "length"
    assert choice["logprobs"]["tokens"] == ["he", "llo"] and "usage" not in whole


@pytest.mark.parametrize("body, said", [
    (sse(chunk(0, {"content": "a"}), done=False), "without [DONE]"),
    (b"data: [1]\n\ndata: [DONE]\n\n", "no JSON object"),
    (b"data: [DONE]\n\n", "no completion"),
    (sse(chunk(0, {"content": "a"}))[:-10], "inside an event"),
])
def test_a_chat_stream_that_is_not_whole_is_refused(body, said):
    with pytest.raises(StreamIncomplete, match=said.replace("[", r"\[").replace("]", r"\]")):
        gather.whole_completion(body)


def test_an_in_band_error_is_the_answer():
    with pytest.raises(gather.InBandError) as raised:
        gather.whole_completion(sse(chunk(0, {"content": "a"}), {"error": {"message": "no", "code": 400}}))
    assert raised.value.status == 400 and json.loads(raised.value.body) == {"error": {"message": "no", "code": 400}}
    with pytest.raises(gather.InBandError) as raised:
        gather.whole_message(b'event: error\ndata: {"type":"error","error":{"type":"overloaded_error",'
                             b'"message":"x"}}\n\n')
    assert raised.value.status == 529


def test_a_responses_stream_is_its_final_response():
    body = (b'event: response.created\ndata: {"type":"response.created","response":{"id":"r","status":"in_progress"}}'
            b'\n\nevent: response.completed\ndata: {"type":"response.completed","response":{"id":"r","status":'
            b'"completed"}}\n\n')
    assert json.loads(gather.whole_response(body)) == {"id": "r", "status": "completed"}
    with pytest.raises(StreamIncomplete):
        gather.whole_response(body.split(b"\n\n")[0] + b"\n\n")
