"""The Messages translation against a real vLLM: what it sends is accepted, and it agrees with vLLM's own endpoint.

vLLM 0.32 serves C{/v1/messages} itself, so the same request can go both
ways: translated to chat completions (and back), and natively. The prompt
both make must be the same (equal token counts), and every event the
translation makes must validate against the official SDK's event types.
"""

import anthropic
import pydantic

from gomodel import jsonutil
from gomodel.anthropic.translate import (ChatToMessagesStream, MessagesStreamObserver, chat_to_message,
                                         count_tokens_answer, count_tokens_request, messages_to_chat)
from tests.integration.support import CHAT_MODEL, request

EVENT = pydantic.TypeAdapter(anthropic.types.RawMessageStreamEvent)

HISTORY = {
    "model": CHAT_MODEL, "max_tokens": 6, "temperature": 0.0, "top_k": 1,
    "system": [{"type": "text", "text": "You answer about the weather."}],
    "metadata": {"user_id": "it-user"},
    "tools": [{"name": "weather", "description": "Current weather in a city",
               "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}],
    "tool_choice": {"type": "tool", "name": "weather", "disable_parallel_tool_use": True},
    "messages": [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": [
            {"type": "thinking", "thinking": "One call.", "signature": ""},
            {"type": "text", "text": "Checking."},
            {"type": "tool_use", "id": "toolu_1", "name": "weather", "input": {"city": "Paris"}}]},
        {"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": "toolu_1", "content": [{"type": "text", "text": "18C, sunny"}]},
            {"type": "text", "text": "And in Oslo?"}]}],
}


def _post(vllm, path, body):
    return request("POST", vllm.chat_root + path, body, timeout=120)


def _events(data: bytes):
    return [jsonutil.loads(block.split(b"\ndata: ", 1)[1]) for block in data.split(b"\n\n") if block]


def test_count_tokens_through_tokenize_agrees_with_vllm(vllm):
    counted = {k: HISTORY[k] for k in ("model", "system", "messages", "tools")}
    native = _post(vllm, "/v1/messages/count_tokens", counted)
    assert native.status == 200, native
    ours = _post(vllm, "/tokenize", count_tokens_request(counted))
    assert ours.status == 200, ours
    assert count_tokens_answer(ours.json()) == {"input_tokens": native.json()["input_tokens"]}


def test_translated_answer_validates_and_counts_like_the_native_one(vllm):
    chat = _post(vllm, "/v1/chat/completions", messages_to_chat(HISTORY))
    assert chat.status == 200, chat
    message = chat_to_message(chat.json(), "my-model")
    anthropic.types.Message.model_validate(message)
    assert message["content"][-1]["type"] == "tool_use" and message["content"][-1]["name"] == "weather"
    assert message["stop_reason"] in ("max_tokens", "tool_use")
    # The native answer would be no use here: vLLM's endpoint answers 400 when the cut-off arguments
    # are not JSON (the translation keeps the call, with input {}); its stream has the usage.
    observer = MessagesStreamObserver()
    native = _post(vllm, "/v1/messages", dict(HISTORY, stream=True))
    observer.feed(native.body)
    observer.finish()
    assert message["usage"]["input_tokens"] == observer.usage["input_tokens"]
    assert message["usage"]["output_tokens"] == observer.usage["output_tokens"] == 6


def test_translated_stream_validates_event_by_event(vllm):
    upstream = _post(vllm, "/v1/chat/completions", messages_to_chat(dict(HISTORY, stream=True)))
    assert upstream.status == 200, upstream
    translator = ChatToMessagesStream("my-model")
    out = b"".join(translator.feed(upstream.body[i:i + 17]) for i in range(0, len(upstream.body), 17))
    translator.finish()
    events = _events(out)
    assert events[1] == {"type": "ping"}  # (Anthropic's, after message_start: the SDK's event types have none)
    del events[1]
    for event in events:
        EVENT.validate_python(event)
    kinds = [e["type"] for e in events]
    assert kinds[0] == "message_start" and kinds[-2:] == ["message_delta", "message_stop"]
    assert "content_block_start" in kinds
    assert translator.usage["output_tokens"] == 6 and translator.usage["input_tokens"] > 0
    assert events[-2]["usage"] == translator.usage


def test_native_stream_is_observed(vllm):
    upstream = _post(vllm, "/v1/messages", dict(HISTORY, stream=True))
    assert upstream.status == 200, upstream
    observer = MessagesStreamObserver()
    relayed = b"".join(observer.feed(upstream.body[i:i + 11]) for i in range(0, len(upstream.body), 11))
    observer.finish()
    assert relayed == upstream.body
    assert observer.done and observer.error is None
    assert observer.usage["output_tokens"] == 6 and observer.usage["input_tokens"] > 0
    assert observer.events == sum(1 for e in _events(upstream.body) if e["type"] == "content_block_delta")
