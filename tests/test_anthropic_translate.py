"""Anthropic Messages <-> chat completions: requests, answers, streams, count_tokens and errors.

Pure units on dicts and bytes, and the official C{anthropic} SDK reading what
the translation produces from a real HTTP server on 127.0.0.1:0.
"""

import anthropic
import pydantic
import pytest
import pytest_twisted
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.web import server
from twisted.web.resource import Resource
from zope.interface.verify import verifyObject

from gomodel import jsonutil
from gomodel.anthropic.translate import (NO_STOP_REASON, PING, ChatToMessagesStream, MessagesStreamObserver,
                                         chat_to_events_bytes, chat_to_message, chat_to_message_bytes,
                                         check_options, check_sampling, check_tool_choice_and_metadata,
                                         check_tool_names,
                                         count_tokens_answer, count_tokens_request, messages_to_chat, omits_thinking,
                                         openai_error_to_anthropic, refuse_server_side, thinking_kind, vllm_fields,
                                         without_vllm_fields)
from gomodel.errors import BadUpstreamResponse, InvalidRequest
from gomodel.interfaces import IStreamObserver
from gomodel.proxy.sse import StreamIncomplete
from tests.support import in_thread

MODEL = "qwen3"
EVENT = pydantic.TypeAdapter(anthropic.types.RawMessageStreamEvent)  # the SDK's own event types, validated


def request(**fields):
    body = {"model": MODEL, "max_tokens": 64, "messages": [{"role": "user", "content": "Hi"}]}
    body.update(fields)
    return body


# -- requests -------------------------------------------------------------------


def test_plain_request_maps_sampling_and_metadata():
    body = request(system="Be brief.", stop_sequences=["END", "###"], temperature=0.2, top_p=0.9,
                   top_k=20, metadata={"user_id": "u-1"}, service_tier="auto")
    chat = messages_to_chat(body)
    # top_k is vLLM's extra: an OpenAI-compatible upstream goes without it (OpenAI refuses unknown fields).
    assert chat == {"model": MODEL, "messages": [{"role": "system", "content": "Be brief."},
                                                 {"role": "user", "content": "Hi"}],
                    "max_tokens": 64, "stop": ["END", "###"], "temperature": 0.2, "top_p": 0.9, "user": "u-1"}
    assert dict(chat, **vllm_fields(body, chat["messages"])) == dict(chat, top_k=20)  # what a vLLM is sent
    assert vllm_fields(body, chat["messages"]) == {"top_k": 20}


def test_stream_asks_for_usage():
    chat = messages_to_chat(request(stream=True))
    assert chat["stream"] is True and chat["stream_options"] == {"include_usage": True}
    assert "stream" not in messages_to_chat(request(stream=False))


def test_system_blocks_join_and_drop_the_billing_header():
    chat = messages_to_chat(request(system=[
        {"type": "text", "text": "x-anthropic-billing-header: cc_version=1; hash=abc"},
        {"type": "text", "text": "You are a coder.", "cache_control": {"type": "ephemeral"}},
        {"type": "text", "text": "Be brief."}]))
    assert chat["messages"][0] == {"role": "system", "content": "You are a coder.\n\nBe brief."}
    with pytest.raises(InvalidRequest, match="system"):
        messages_to_chat(request(system=[{"type": "image", "source": {}}]))


def test_an_inline_system_message_joins_the_leading_one():
    chat = messages_to_chat(request(system="A.", messages=[{"role": "user", "content": "Hi"},
                                                           {"role": "system", "content": "B."}]))
    assert chat["messages"] == [{"role": "system", "content": "A.\n\nB."}, {"role": "user", "content": "Hi"}]


def test_user_blocks_text_and_images():
    chat = messages_to_chat(request(messages=[{"role": "user", "content": [
        {"type": "text", "text": "What is in"},
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}},
        {"type": "image", "source": {"type": "url", "url": "https://example.test/cat.jpg"}},
        {"type": "document", "source": {"type": "text", "media_type": "text/plain", "data": "notes"}},
        {"type": "text", "text": "these?"}]}]))
    assert chat["messages"] == [{"role": "user", "content": [
        {"type": "text", "text": "What is in"},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}},
        {"type": "image_url", "image_url": {"url": "https://example.test/cat.jpg"}},
        {"type": "text", "text": "notes"},
        {"type": "text", "text": "these?"}]}]
    one = messages_to_chat(request(messages=[{"role": "user", "content": [{"type": "text", "text": "solo"}]}]))
    assert one["messages"] == [{"role": "user", "content": "solo"}]


PNG = {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}


def test_documents_of_custom_content_become_text_and_image_parts():
    document = {"type": "document", "title": "Notes", "source": {"type": "content", "content": [
        {"type": "text", "text": "Page one."}, {"type": "image", "source": PNG},
        {"type": "text", "text": "Page two."}]}}
    chat = messages_to_chat(request(messages=[{"role": "user", "content": [document, {"type": "text", "text": "?"}]}]))
    # (its title in Anthropic's prompt formatting of a document: test_messages)
    opening, closing = "<document>\n<source>Notes</source>\n<document_content>\n", "\n</document_content>\n</document>"
    assert chat["messages"] == [{"role": "user", "content": [
        {"type": "text", "text": opening + "Page one."},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}},
        {"type": "text", "text": "Page two." + closing}, {"type": "text", "text": "?"}]}]
    text_only = {"type": "document", "source": {"type": "content", "content": "Just text."}}
    chat = messages_to_chat(request(messages=[{"role": "user", "content": [text_only]}]))
    assert chat["messages"] == [{"role": "user", "content": "Just text."}]
    # In a tool result: its text joins the tool message, its images go in the user message after it.
    chat = messages_to_chat(request(messages=[
        {"role": "user", "content": "Read it."},
        {"role": "assistant", "content": [{"type": "tool_use", "id": "t1", "name": "read", "input": {}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1", "content": [document]}]}]))
    assert chat["messages"][2:] == [
        {"role": "tool", "tool_call_id": "t1", "content": opening + "Page one.\nPage two." + closing},
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}]}]


@pytest.mark.parametrize("content, param", [
    ([{"type": "document", "source": {"type": "base64", "media_type": "application/pdf", "data": "JVBER"}}],
     "messages.0.content.0.source.content.0"),
    ([{"type": "text", "text": "a"}, {"type": "image", "source": {"type": "file", "file_id": "f1"}}],
     "messages.0.content.0.source.content.1"),
    ([{"type": "text", "text": 5}], "messages.0.content.0.source.content.0.text"),
    ({"type": "text", "text": "a"}, "messages.0.content.0.source.content"),
])
def test_custom_content_documents_that_cannot_be_sent_are_refused(content, param):
    block = {"type": "document", "source": {"type": "content", "content": content}}
    with pytest.raises(InvalidRequest) as caught:
        messages_to_chat(request(messages=[{"role": "user", "content": [block]}]))
    assert caught.value.status == 400 and caught.value.param == param


def test_a_base64_text_document_is_its_text_and_one_that_is_no_text_is_refused():
    source = {"type": "base64", "media_type": "text/markdown", "data": "IyBUaXRsZQ=="}  # "# Title"
    chat = messages_to_chat(request(messages=[{"role": "user", "content": [{"type": "document", "source": source}]}]))
    assert chat["messages"] == [{"role": "user", "content": "# Title"}]
    for data in ("not base64!", "/w=="):  # (no base64; no UTF-8)
        block = {"type": "document", "source": dict(source, data=data)}
        with pytest.raises(InvalidRequest) as caught:
            messages_to_chat(request(messages=[{"role": "user", "content": [block]}]))
        assert caught.value.param == "messages.0.content.0.source.data" and "base64" in str(caught.value)


@pytest.mark.parametrize("block", [
    {"type": "image", "source": {"type": "file", "file_id": "f1"}},
    {"type": "document", "source": {"type": "base64", "media_type": "application/pdf", "data": "JVBER"}},
    {"type": "web_search_tool_result", "tool_use_id": "s", "content": []},  # (a search_result is sent as text)
    {"type": "tool_use", "id": "t", "name": "f", "input": {}},
    {"type": "thinking", "thinking": "x", "signature": ""},
])
def test_user_blocks_that_cannot_be_sent_are_refused(block):
    with pytest.raises(InvalidRequest) as caught:
        messages_to_chat(request(messages=[{"role": "user", "content": [block]}]))
    assert caught.value.status == 400 and caught.value.param == "messages.0.content.0"


@pytest.mark.parametrize("source, field, said", [
    ({"type": "url"}, "url", "Field required"),
    ({"type": "url", "url": 5}, "url", "Input should be a valid string"),
    ({"type": "base64", "media_type": "image/png"}, "data", "Field required"),
    ({"type": "base64", "media_type": "image/png", "data": None}, "data", "Field required"),
])
def test_an_image_source_without_its_url_or_data_is_a_400_naming_that_field(source, field, said):
    """Before, the 400 said the source's own type was not supported ("image source type 'url' is not supported by
    this provider (use 'base64' or 'url')"), whether in a message or a tool result."""
    image = {"type": "image", "source": source}
    for content, at in (([image], "messages.0.content.0"),
                        ([{"type": "tool_result", "tool_use_id": "t", "content": [image]}], "messages.0.content.0.content.0")):
        with pytest.raises(InvalidRequest) as caught:
            messages_to_chat(request(messages=[{"role": "user", "content": content}]))
        assert caught.value.status == 400 and caught.value.param == f"{at}.source.{field}"
        assert caught.value.message == f"{at}.source.{field}: {said}"


def test_a_tool_round_trip():
    chat = messages_to_chat(request(messages=[
        {"role": "user", "content": "Weather in Paris and Oslo?"},
        {"role": "assistant", "content": [
            {"type": "thinking", "thinking": "Two cities, ", "signature": "sig"},
            {"type": "redacted_thinking", "data": "EmwKAhgB"},
            {"type": "thinking", "thinking": "two calls.", "signature": ""},
            {"type": "text", "text": "Checking."},
            {"type": "tool_use", "id": "toolu_1", "name": "weather", "input": {"city": "Paris"}},
            {"type": "tool_use", "id": "toolu_2", "name": "weather", "input": {"city": "Oslo", "units": "C"}}]},
        {"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": "toolu_1", "content": "18C, sunny"},
            {"type": "tool_result", "tool_use_id": "toolu_2", "is_error": True, "content": [
                {"type": "text", "text": "station down"}, {"type": "text", "text": "retry later"},
                {"type": "image", "source": {"type": "url", "url": "https://example.test/map.png"}}]},
            {"type": "text", "text": "Summarise."}]}]))
    assert chat["messages"] == [
        {"role": "user", "content": "Weather in Paris and Oslo?"},
        {"role": "assistant", "content": "Checking.", "reasoning_content": "Two cities, two calls.", "tool_calls": [
            {"id": "toolu_1", "type": "function", "function": {"name": "weather", "arguments": '{"city":"Paris"}'}},
            {"id": "toolu_2", "type": "function",
             "function": {"name": "weather", "arguments": '{"city":"Oslo","units":"C"}'}}]},
        {"role": "tool", "tool_call_id": "toolu_1", "content": "18C, sunny"},
        {"role": "tool", "tool_call_id": "toolu_2", "content": "Error: station down\nretry later"},
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://example.test/map.png"}},
                                     {"type": "text", "text": "Summarise."}]}]


def test_a_tool_search_result_names_the_tools_it_found():
    # Claude Code's tool search: deferred tools, and a tool_result of tool_reference blocks naming those it found.
    deferred = {"name": "weather", "defer_loading": True, "input_schema": {"type": "object"}}
    body = request(tools=[{"name": "ToolSearch", "input_schema": {"type": "object"}}, deferred], messages=[
        {"role": "assistant", "content": [{"type": "tool_use", "id": "t1", "name": "ToolSearch",
                                           "input": {"query": "weather"}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1", "content": [
            {"type": "tool_reference", "tool_name": "weather", "cache_control": {"type": "ephemeral"}},
            {"type": "tool_reference", "tool_name": "forecast"}]}]}])
    chat = messages_to_chat(body)
    assert chat["messages"][1] == {"role": "tool", "tool_call_id": "t1", "content": "weather\nforecast"}
    assert chat["tools"][1] == {"type": "function", "function": {"name": "weather", "parameters": {"type": "object"}}}
    assert count_tokens_request(body)["messages"][1]["content"] == "weather\nforecast"
    body["messages"][1]["content"][0]["content"] = [{"type": "tool_reference"}]
    with pytest.raises(InvalidRequest) as caught:
        messages_to_chat(body)
    assert caught.value.param == "messages.1.content.0.content.0.tool_name"


def test_tool_results_alone_make_only_tool_messages():
    chat = messages_to_chat(request(messages=[
        {"role": "assistant", "content": [{"type": "tool_use", "id": "t1", "name": "f", "input": {}},
                                          {"type": "tool_use", "id": "t2", "name": "f", "input": {}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1"},
                                     {"type": "tool_result", "tool_use_id": "t2", "is_error": True}]}]))
    assert chat["messages"] == [
        {"role": "assistant", "content": None,
         "tool_calls": [{"id": "t1", "type": "function", "function": {"name": "f", "arguments": "{}"}},
                        {"id": "t2", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "t1", "content": ""},
        {"role": "tool", "tool_call_id": "t2", "content": "Error"}]


def test_tools_and_tool_choice():
    tools = [{"name": "weather", "description": "Current weather", "input_schema": {
        "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}},
        {"type": "custom", "name": "noop", "input_schema": {"type": "object"}, "strict": True,
         "cache_control": {"type": "ephemeral"}}]
    chat = messages_to_chat(request(tools=tools))
    assert chat["tools"] == [
        {"type": "function", "function": {"name": "weather", "description": "Current weather",
                                          "parameters": tools[0]["input_schema"]}},
        {"type": "function", "function": {"name": "noop", "parameters": {"type": "object"}, "strict": True}}]
    assert "tool_choice" not in chat and "parallel_tool_calls" not in chat
    cases = [({"type": "auto"}, "auto"), ({"type": "any"}, "required"), ({"type": "none"}, "none"),
             ({"type": "tool", "name": "weather"}, {"type": "function", "function": {"name": "weather"}})]
    for choice, expected in cases:
        chat = messages_to_chat(request(tools=tools, tool_choice=choice))
        assert chat["tool_choice"] == expected and "parallel_tool_calls" not in chat
    chat = messages_to_chat(request(tools=tools, tool_choice={"type": "any", "disable_parallel_tool_use": True}))
    assert chat["tool_choice"] == "required" and chat["parallel_tool_calls"] is False


def test_an_auto_or_none_tool_choice_without_tools_is_left_out():
    # Chat upstreams (vLLM among them) refuse a tool_choice without tools; Anthropic takes it.
    for kind in ("auto", "none"):
        chat = messages_to_chat(request(tool_choice={"type": kind, "disable_parallel_tool_use": True}))
        assert "tool_choice" not in chat and "parallel_tool_calls" not in chat
        assert "tool_choice" not in messages_to_chat(request(tools=[], tool_choice={"type": kind}))
    # One that asks for a tool is Anthropic's 400 (before, "any" went as "required").
    for choice in ({"type": "any"}, {"type": "tool", "name": "f"}):
        with pytest.raises(InvalidRequest) as caught:
            messages_to_chat(request(tools=[], tool_choice=choice))
        assert caught.value.param == "tool_choice"
        assert str(caught.value) == (f"tool_choice: tool_choice of type {choice['type']!r} may only be specified "
                                     "while providing tools")


@pytest.mark.parametrize("fields, param", [
    ({"tools": [{"type": "web_search_20250305", "name": "web_search"}]}, "tools.0"),
    ({"tools": [{"name": "f"}]}, "tools.0.input_schema"),
    ({"tools": {"name": "f"}}, "tools"),
    ({"tool_choice": {"type": "tool"}}, "tool_choice.name"),
    ({"tool_choice": {"type": "sometimes"}}, "tool_choice"),
    ({"tool_choice": {"type": "tool", "name": "nowhere"}}, "tool_choice"),
    ({"tools": [{"name": "f", "input_schema": {}}], "tool_choice": {"type": "tool", "name": "g"}},
     "tool_choice.name"),
    ({"metadata": {"user_id": 42}}, "metadata.user_id"),
    ({"metadata": ["u-1"]}, "metadata"),
])
def test_tools_that_cannot_be_sent_are_refused(fields, param):
    with pytest.raises(InvalidRequest) as caught:
        messages_to_chat(request(**fields))
    assert caught.value.param == param


def test_thinking_switches_the_template():
    enabled = messages_to_chat(request(max_tokens=2048, thinking={"type": "enabled", "budget_tokens": 1024}))
    assert enabled["chat_template_kwargs"] == {"enable_thinking": True}
    for budget, max_tokens, words in ((512, 2048, "greater than or equal to 1024"), (None, 2048, "Field required"),
                                      ("2000", 4096, "valid integer"),
                                      (1024, 1024, "max_tokens")):
        with pytest.raises(InvalidRequest, match=words) as caught:
            messages_to_chat(request(max_tokens=max_tokens, thinking={"type": "enabled", "budget_tokens": budget}))
        assert caught.value.param == "thinking.budget_tokens"
    disabled = messages_to_chat(request(thinking={"type": "disabled"},
                                        chat_template_kwargs={"custom": 1, "enable_thinking": True}))
    assert disabled["chat_template_kwargs"] == {"custom": 1, "enable_thinking": False}
    assert messages_to_chat(request(thinking={"type": "adaptive"}))["chat_template_kwargs"] == {
        "enable_thinking": True}
    assert "chat_template_kwargs" not in messages_to_chat(request())
    with pytest.raises(InvalidRequest, match="thinking.type"):
        messages_to_chat(request(thinking={"type": "deep"}))


def test_output_config_becomes_a_response_format():
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    chat = messages_to_chat(request(output_config={"format": {"type": "json_schema", "schema": schema},
                                                   "effort": "low"}))
    assert chat["response_format"] == {"type": "json_schema", "json_schema": {"name": "output", "schema": schema}}
    assert chat["reasoning_effort"] == "low"


@pytest.mark.parametrize("body, param, words", [
    ({"model": MODEL, "max_tokens": 8}, "messages", "Field required"),
    ({"model": MODEL, "max_tokens": 8, "messages": "Hi"}, "messages", "list"),
    ({"model": MODEL, "max_tokens": 8, "messages": []}, "messages", "at least one"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "Hi"}]}, "max_tokens", "Field required"),
    ({"model": MODEL, "max_tokens": "8", "messages": [{"role": "user", "content": "Hi"}]}, "max_tokens", "integer"),
    ({"model": MODEL, "max_tokens": 8, "messages": [{"role": "tool", "content": "Hi"}]}, "messages.0.role", "user"),
    ({"model": MODEL, "max_tokens": 8, "messages": [{"role": "user", "content": 5}]}, "messages.0.content", "string"),
    ({"model": MODEL, "max_tokens": 8, "messages": [{"role": "user", "content": [{"type": "audio"}]}]},
     "messages.0.content.0", "unknown content block type 'audio'"),
    ({"model": MODEL, "max_tokens": 8, "messages": [{"role": "user", "content": [{"text": "typeless"}]}]},
     "messages.0.content.0", "type"),
    ({"model": MODEL, "max_tokens": 8, "messages": [{"role": "user", "content": [
        {"type": "tool_result", "content": "x"}]}]}, "messages.0.content.0.tool_use_id", "Field required"),
    ({"model": MODEL, "max_tokens": 8, "messages": [{"role": "assistant", "content": [
        {"type": "tool_use", "id": "t", "input": {}}]}]}, "messages.0.content.0.name", "Field required"),
    ({"model": MODEL, "max_tokens": 8, "messages": [{"role": "user", "content": "Hi"}], "stop_sequences": "END"},
     "stop_sequences", "list"),
    ({"model": MODEL, "max_tokens": 0, "messages": [{"role": "user", "content": "Hi"}]}, "max_tokens",
     "greater than or equal to 1"),
    ({"model": MODEL, "max_tokens": -5, "messages": [{"role": "user", "content": "Hi"}]}, "max_tokens",
     "greater than or equal to 1"),
    ({"model": MODEL, "max_tokens": 8, "messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]},
     "messages.0.content.0.text", "valid string"),
    ({"model": MODEL, "max_tokens": 8, "messages": [{"role": "user", "content": "Hi"}, {"role": "assistant",
     "content": [{"type": "text", "text": ["x"]}]}]}, "messages.1.content.0.text", "valid string"),
    ({"model": MODEL, "max_tokens": 8, "messages": [{"role": "user", "content": [
        {"type": "tool_result", "tool_use_id": "t", "content": [{"type": "text", "text": 5}]}]}]},
     "messages.0.content.0.content.0.text", "valid string"),
    ({"model": MODEL, "max_tokens": 8, "messages": [{"role": "assistant", "content": [
        {"type": "tool_use", "id": 5, "name": "f", "input": {}}]}]}, "messages.0.content.0.id", "valid string"),
    ({"model": MODEL, "max_tokens": 8, "messages": [{"role": "assistant", "content": [
        {"type": "tool_use", "id": "t", "name": "f", "input": "x"}]}]}, "messages.0.content.0.input", "object"),
    ({"model": MODEL, "max_tokens": 8, "messages": [{"role": "user", "content": [
        {"type": "image", "source": {"type": "base64", "media_type": 5, "data": "x"}}]}]},
     "messages.0.content.0.source.media_type", "Input should be 'image/jpeg', 'image/png', 'image/gif' or"),
])
def test_malformed_requests_are_refused_clearly(body, param, words):
    with pytest.raises(InvalidRequest) as caught:
        messages_to_chat(body)
    assert caught.value.param == param and words in caught.value.message
    assert caught.value.status == 400 and caught.value.type == "invalid_request_error"


def test_a_body_that_is_not_an_object_is_refused():
    with pytest.raises(InvalidRequest):
        messages_to_chat([])


def test_assistant_history_with_only_thinking_keeps_an_empty_content():
    chat = messages_to_chat(request(messages=[
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": [{"type": "thinking", "thinking": "hm", "signature": ""}]}]))
    assert chat["messages"][1] == {"role": "assistant", "content": "", "reasoning_content": "hm"}


def test_an_upstream_other_than_vllm_gets_neither_the_template_switch_nor_past_thinking():
    chat = messages_to_chat(request(max_tokens=2048, thinking={"type": "enabled", "budget_tokens": 1024}, messages=[
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": [{"type": "thinking", "thinking": "hm", "signature": ""},
                                          {"type": "text", "text": "Hello."}]},
        {"role": "user", "content": "Again"}]))
    other = without_vllm_fields(chat)
    assert "chat_template_kwargs" not in other
    assert other["messages"] == [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."},
                                 {"role": "user", "content": "Again"}]
    assert chat["chat_template_kwargs"] == {"enable_thinking": True}  # (a copy: the vLLM form is kept)
    assert chat["messages"][1]["reasoning_content"] == "hm"
    plain = messages_to_chat(request())
    assert without_vllm_fields(plain) == plain and without_vllm_fields(plain)["messages"] is plain["messages"]


PREFILL = [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "The colour is"}]


def for_vllm(body):
    """The chat request a vLLM upstream is sent for C{body}, as the Messages route makes it."""
    chat = messages_to_chat(body)
    chat.update(vllm_fields(body, chat["messages"]))
    return chat


def test_a_final_assistant_message_is_continued_on_vllm_only():
    chat = for_vllm(request(messages=PREFILL))
    assert chat["messages"][-1] == {"role": "assistant", "content": "The colour is"}
    assert chat["continue_final_message"] is True and chat["add_generation_prompt"] is False
    # Any other upstream: chat completions have no such field, the prefill goes as a finished turn.
    plain = messages_to_chat(request(messages=PREFILL))
    assert "continue_final_message" not in plain and "add_generation_prompt" not in plain
    assert plain["messages"] == chat["messages"]
    # Blocks too; and a conversation that ends with the user is not continued.
    blocks = [PREFILL[0], {"role": "assistant", "content": [{"type": "text", "text": "The colour is"}]}]
    assert for_vllm(request(messages=blocks))["continue_final_message"] is True
    assert "continue_final_message" not in for_vllm(request())
    counted = count_tokens_request(request(messages=PREFILL))
    assert counted["continue_final_message"] is True and counted["add_generation_prompt"] is False


@pytest.mark.parametrize("content", ["The colour is ", "The colour is\n",
                                     [{"type": "text", "text": "a"}, {"type": "text", "text": "b\t"}]])
def test_a_final_assistant_message_ending_in_whitespace_is_refused_as_anthropic_does(content):
    body = request(messages=[PREFILL[0], {"role": "assistant", "content": content}])
    for translate_it in (messages_to_chat, count_tokens_request):
        with pytest.raises(InvalidRequest) as caught:
            translate_it(body)
        assert caught.value.status == 400
        assert str(caught.value.message) == "messages: final assistant content cannot end with trailing whitespace"
    # Only the final one: earlier assistant turns may end as they like.
    messages_to_chat(request(messages=[PREFILL[0], {"role": "assistant", "content": content},
                                       {"role": "user", "content": "Go on."}]))


@pytest.mark.parametrize("content", [" ", "\n\t", [{"type": "text", "text": "  "}]])
def test_a_final_assistant_message_of_nothing_but_whitespace_is_one_blank_text_block_string_or_not(content):
    """A string is one text block to Anthropic: a final assistant string of nothing but whitespace is refused as
    that block is ("text content blocks must contain non-whitespace text", before the prefill's own rule); the
    string was the trailing whitespace 400, its block form the blank text's."""
    body = request(messages=[PREFILL[0], {"role": "assistant", "content": content}])
    for translate_it in (messages_to_chat, count_tokens_request):
        with pytest.raises(InvalidRequest) as caught:
            translate_it(body)
        assert str(caught.value.message) == "messages: text content blocks must contain non-whitespace text"
    for empty in ("", []):  # (an empty prefill is taken, as Anthropic takes it)
        assert messages_to_chat(request(messages=[PREFILL[0], {"role": "assistant", "content": empty}]))


# -- count_tokens ---------------------------------------------------------------


def test_count_tokens_request_and_answer():
    tools = [{"name": "f", "input_schema": {"type": "object"}}]
    body = {"model": MODEL, "system": "S", "messages": [{"role": "user", "content": "Hi"}], "tools": tools,
            "tool_choice": {"type": "auto"}, "thinking": {"type": "enabled", "budget_tokens": 2048}}
    assert count_tokens_request(body) == {
        "model": MODEL, "messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "Hi"}],
        "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}],
        "chat_template_kwargs": {"enable_thinking": True}, "add_generation_prompt": True}
    assert count_tokens_request({"model": MODEL, "messages": [{"role": "user", "content": "x"}]}) == {
        "model": MODEL, "messages": [{"role": "user", "content": "x"}], "add_generation_prompt": True}
    with pytest.raises(InvalidRequest):
        count_tokens_request({"model": MODEL})
    assert count_tokens_answer({"count": 17, "max_model_len": 2048, "tokens": [1] * 17}) == {"input_tokens": 17}
    assert count_tokens_answer({"tokens": [1, 2, 3]}) == {"input_tokens": 3}
    with pytest.raises(ValueError):
        count_tokens_answer({"detail": "nope"})


# -- answers --------------------------------------------------------------------


def chat_answer(message, finish="stop", stop_reason=None, usage=None):
    return {"id": "chatcmpl-7f3a", "object": "chat.completion", "created": 1700000000, "model": "Qwen/Qwen3-0.6B",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": None, "refusal": None,
                                                 "tool_calls": [], **message},
                         "logprobs": None, "finish_reason": finish, "stop_reason": stop_reason}],
            "usage": usage or {"prompt_tokens": 12, "completion_tokens": 5, "total_tokens": 17,
                               "prompt_tokens_details": None},
            "prompt_logprobs": None, "kv_transfer_params": None}


def call(call_id, name, arguments):
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}


def test_a_text_answer():
    message = chat_to_message(chat_answer({"content": "Bonjour é"}), "my-model")
    assert message == {"id": "msg_7f3a", "type": "message", "role": "assistant", "model": "my-model",
                       "content": [{"type": "text", "text": "Bonjour é"}], "stop_reason": "end_turn",
                       "stop_sequence": None, "usage": {"input_tokens": 12, "output_tokens": 5}}


def test_cached_prompt_tokens_are_reported_apart():
    usage = {"prompt_tokens": 100, "completion_tokens": 5, "total_tokens": 105,
             "prompt_tokens_details": {"cached_tokens": 64}}
    message = chat_to_message(chat_answer({"content": "x"}, usage=usage), MODEL)
    assert message["usage"] == {"input_tokens": 36, "output_tokens": 5, "cache_read_input_tokens": 64}


def test_reasoning_text_and_tool_calls():
    chat = chat_answer({"reasoning_content": "Think first.", "content": "Let me look.", "tool_calls": [
        call("chatcmpl-tool-1", "weather", '{"city": "Paris"}'),
        call("chatcmpl-tool-2", "weather", '{"city": "Oslo"}')]}, finish="tool_calls")
    message = chat_to_message(chat, MODEL)
    assert message["content"] == [
        {"type": "thinking", "thinking": "Think first.", "signature": ""},
        {"type": "text", "text": "Let me look."},
        {"type": "tool_use", "id": "chatcmpl-tool-1", "name": "weather", "input": {"city": "Paris"}},
        {"type": "tool_use", "id": "chatcmpl-tool-2", "name": "weather", "input": {"city": "Oslo"}}]
    assert message["stop_reason"] == "tool_use"
    anthropic.types.Message.model_validate(message)
    # vLLM 0.32 names it "reasoning".
    assert chat_to_message(chat_answer({"reasoning": "R", "content": "T"}), MODEL)["content"][0]["thinking"] == "R"


def test_unparsable_tool_arguments_become_an_empty_input():
    message = chat_to_message(chat_answer({"tool_calls": [call("c1", "f", '{"city": "Par'), call("c2", "g", ""),
                                                          call("c3", "h", "[1, 2]")]}, finish="tool_calls"), MODEL)
    assert [b["input"] for b in message["content"]] == [{}, {}, {}]


def test_answers_of_other_chat_shapes_keep_their_content():
    # Text as content parts, arguments as an object, ids and names of other types (lenient upstreams).
    message = chat_to_message(chat_answer({"content": [{"type": "text", "text": "Bon"}, {"type": "image_url"},
                                                       {"type": "text", "text": "jour"}],
                                           "tool_calls": [{"id": 7, "type": "function",
                                                           "function": {"name": "f", "arguments": {"a": 1}}},
                                                          {"id": "c2", "function": "broken"}]},
                                          finish="tool_calls"), MODEL)
    text, first, second = message["content"]
    assert text == {"type": "text", "text": "Bonjour"}
    assert first["input"] == {"a": 1} and first["name"] == "f" and first["id"].startswith("toolu_")
    assert second == {"type": "tool_use", "id": "c2", "name": "", "input": {}}
    assert message["stop_reason"] == "tool_use"
    anthropic.types.Message.model_validate(message)


@pytest.mark.parametrize("finish, matched, calls, reason, sequence", [
    ("stop", None, [], "end_turn", None),
    ("stop", 151645, [], "end_turn", None),  # a stop token id is no stop sequence
    ("stop", "###", [], "stop_sequence", "###"),
    ("length", None, [], "max_tokens", None),
    ("length", None, [call("c", "f", '{"a": 1}')], "max_tokens", None),
    ("tool_calls", None, [call("c", "f", '{"a": 1}')], "tool_use", None),
    ("stop", None, [call("c", "f", '{"a": 1}')], "tool_use", None),  # a named tool choice ends with "stop"
    ("stop", "###", [call("c", "f", '{"a": 1}')], "tool_use", None),
    ("stop", "###", [call("c", "f", '{"a": ')], "stop_sequence", "###"),  # the stop string cut the call short
    ("content_filter", None, [], "refusal", None),
])
def test_every_stop_reason(finish, matched, calls, reason, sequence):
    message = chat_to_message(chat_answer({"content": "x", "tool_calls": calls}, finish, matched), MODEL)
    assert (message["stop_reason"], message["stop_sequence"]) == (reason, sequence)


@pytest.mark.parametrize("finish", ["abort", "error"])
def test_an_aborted_generation_is_an_error_never_a_finished_message(finish):
    with pytest.raises(BadUpstreamResponse, match=finish):
        chat_to_message(chat_answer({"content": "x"}, finish), MODEL)
    stream = ChatToMessagesStream(MODEL)
    chunk = {"id": "c", "choices": [{"index": 0, "delta": {"content": "x"}, "finish_reason": None}]}
    end = {"id": "c", "choices": [{"index": 0, "delta": {}, "finish_reason": finish}]}
    out = stream.feed(b"".join(b"data: " + jsonutil.dumps(c) + b"\n\n" for c in (chunk, end))
                      + b"data: [DONE]\n\n")
    kinds = [line.split(b": ", 1)[1] for line in out.split(b"\n") if line.startswith(b"event: ")]
    assert kinds[-1] == b"error" and b"message_stop" not in kinds and b"message_delta" not in kinds
    assert stream.done and stream.error is not None


def test_an_empty_answer_has_one_empty_text_block_and_a_refusal_is_text():
    assert chat_to_message(chat_answer({"content": ""}), MODEL)["content"] == [{"type": "text", "text": ""}]
    refused = chat_to_message(chat_answer({"refusal": "I can't."}, "content_filter"), MODEL)
    assert refused["content"] == [{"type": "text", "text": "I can't."}] and refused["stop_reason"] == "refusal"


def test_answer_without_id_or_usage():
    chat = chat_answer({"content": "x"})
    del chat["id"], chat["usage"]
    message = chat_to_message(chat, MODEL)
    assert message["id"].startswith("msg_") and len(message["id"]) > 10
    assert message["usage"] == {"input_tokens": 0, "output_tokens": 0}


def test_answer_bytes_for_the_transform_hook():
    body = jsonutil.dumps(chat_answer({"content": "é"}))
    assert jsonutil.loads(chat_to_message_bytes(body, MODEL))["content"] == [{"type": "text", "text": "é"}]
    with pytest.raises(ValueError):
        chat_to_message_bytes(b"<html>", MODEL)
    with pytest.raises(ValueError):
        chat_to_message_bytes(b'{"choices": []}', MODEL)
    with pytest.raises(TypeError):
        chat_to_message_bytes(b"[1]", MODEL)
    with pytest.raises(TypeError):
        chat_to_message_bytes(b'{"choices": [{"message": "x"}]}', MODEL)


# -- errors ---------------------------------------------------------------------


@pytest.mark.parametrize("status, kind", [
    (400, "invalid_request_error"), (401, "authentication_error"), (403, "permission_error"),
    (404, "not_found_error"), (413, "request_too_large"), (429, "rate_limit_error"), (500, "api_error"),
    (502, "api_error"), (503, "overloaded_error"), (529, "overloaded_error"), (504, "timeout_error"),
])
def test_upstream_errors_in_anthropic_shape(status, kind):
    body = jsonutil.dumps({"error": {"message": "It broke.", "type": "BadRequestError", "param": None,
                                     "code": status}})
    assert jsonutil.loads(openai_error_to_anthropic(status, body)) == {
        "type": "error", "error": {"type": kind, "message": "It broke."}}


def test_upstream_error_bodies_of_other_shapes():
    assert jsonutil.loads(openai_error_to_anthropic(401, b'{"error":"Unauthorized"}'))["error"] == {
        "type": "authentication_error", "message": "Unauthorized"}
    assert jsonutil.loads(openai_error_to_anthropic(404, b'{"detail":"Not Found"}'))["error"]["message"] == \
        "Not Found"
    native = b'{"type":"error","error":{"type":"overloaded_error","message":"Busy"}}'
    assert jsonutil.loads(openai_error_to_anthropic(500, native))["error"] == {
        "type": "overloaded_error", "message": "Busy"}
    vllm_native = b'{"type":"error","error":{"type":"BadRequestError","message":"Expecting value"}}'
    assert jsonutil.loads(openai_error_to_anthropic(400, vllm_native))["error"] == {
        "type": "invalid_request_error", "message": "Expecting value"}
    assert jsonutil.loads(openai_error_to_anthropic(502, b"<html>bad gateway</html>"))["error"] == {
        "type": "api_error", "message": "The upstream answered with HTTP status 502."}


# -- the chat stream translated -------------------------------------------------


def chunk(delta=None, finish=None, stop_reason=None, usage=None, choices=True):
    payload = {"id": "chatcmpl-b1e2", "object": "chat.completion.chunk", "created": 1700000000,
               "model": "Qwen/Qwen3-0.6B"}
    if choices:
        payload["choices"] = [{"index": 0, "delta": delta or {}, "logprobs": None, "finish_reason": finish,
                               **({"stop_reason": stop_reason} if finish else {})}]
    else:
        payload["choices"] = []
    if usage is not None:
        payload["usage"] = usage
    return b"data: " + jsonutil.dumps(payload) + b"\n\n"


DONE = b"data: [DONE]\n\n"
USAGE = {"prompt_tokens": 40, "total_tokens": 58, "completion_tokens": 18,
         "prompt_tokens_details": {"cached_tokens": 32}}


def tool_delta(index, call_id=None, name=None, arguments=None):
    delta = {"index": index}
    if call_id:
        delta.update({"id": call_id, "type": "function"})
    function = {}
    if name:
        function["name"] = name
    if arguments is not None:
        function["arguments"] = arguments
    delta["function"] = function
    return {"tool_calls": [delta]}


# vLLM 0.32 with a reasoning parser and a tool parser: reasoning, text, then two
# calls whose arguments stream in fragments (one cut inside "é"), usage, [DONE].
FULL = [
    chunk({"role": "assistant", "content": ""}),
    chunk({"reasoning": "The user wants "}),
    chunk({"reasoning": "two cities 🌍."}),
    chunk({"content": "Je regarde "}),
    chunk({"content": "la météo."}),
    chunk(tool_delta(0, "chatcmpl-tool-a1", "weather", "")),
    chunk(tool_delta(0, arguments='{"city": ')),
    chunk(tool_delta(0, arguments='"Paris"}')),
    chunk(tool_delta(1, "chatcmpl-tool-b2", "weather", "")),
    chunk(tool_delta(1, arguments='{"city": "Tromsø", ')),
    chunk(tool_delta(1, arguments='"note": "é"}')),
    chunk({"content": ""}, finish="tool_calls"),
    chunk(choices=False, usage=USAGE),
    DONE,
]


def events_of(data: bytes):
    """(event name, payload) for each event, checking Anthropic's framing on the way."""
    assert data.endswith(b"\n\n")
    out = []
    for raw in data[:-2].split(b"\n\n"):
        head, body = raw.split(b"\n")
        assert head.startswith(b"event: ") and body.startswith(b"data: ")
        payload = jsonutil.loads(body[len(b"data: "):])
        assert payload["type"] == head[len(b"event: "):].decode()
        assert list(payload)[0] == "type"
        out.append((payload["type"], payload))
    # Anthropic's ping right after message_start, once (the SDK's event types have none: left out here).
    if out and out[0][0] == "message_start":
        assert out[1] == ("ping", {"type": "ping"}), "no ping after message_start"
        del out[1]
    assert all(kind != "ping" for kind, _ in out)
    return out


def translate(stream: bytes, step=None, **kwargs):
    translator = ChatToMessagesStream(MODEL, **kwargs)
    if step is None:
        out = translator.feed(stream)
    else:
        out = b"".join(translator.feed(stream[i:i + step]) for i in range(0, len(stream), step))
    return translator, out


def test_full_stream_event_sequence():
    translator, out = translate(b"".join(FULL))
    translator.finish()
    events = events_of(out)
    assert [(kind, p.get("index"), (p.get("delta") or p.get("content_block") or {}).get("type"))
            for kind, p in events] == [
        ("message_start", None, None),
        ("content_block_start", 0, "thinking"), ("content_block_delta", 0, "thinking_delta"),
        ("content_block_delta", 0, "thinking_delta"), ("content_block_delta", 0, "signature_delta"),
        ("content_block_stop", 0, None),
        ("content_block_start", 1, "text"), ("content_block_delta", 1, "text_delta"),
        ("content_block_delta", 1, "text_delta"), ("content_block_stop", 1, None),
        ("content_block_start", 2, "tool_use"), ("content_block_delta", 2, "input_json_delta"),
        ("content_block_delta", 2, "input_json_delta"), ("content_block_stop", 2, None),
        # The second call's fragments are held while the first call's block is open (it might get more): whole.
        ("content_block_start", 3, "tool_use"), ("content_block_delta", 3, "input_json_delta"),
        ("content_block_stop", 3, None),
        ("message_delta", None, None), ("message_stop", None, None)]
    payloads = [p for _, p in events]
    for payload in payloads:
        EVENT.validate_python(payload)
    assert payloads[0] == {"type": "message_start", "message": {
        "id": "msg_b1e2", "type": "message", "role": "assistant", "model": MODEL, "content": [],
        "stop_reason": None, "stop_sequence": None, "usage": {"input_tokens": 0, "output_tokens": 0}}}
    assert payloads[1]["content_block"] == {"type": "thinking", "thinking": "", "signature": ""}
    assert payloads[4]["delta"] == {"type": "signature_delta", "signature": ""}
    assert payloads[6]["content_block"] == {"type": "text", "text": ""}
    assert payloads[10]["content_block"] == {"type": "tool_use", "id": "chatcmpl-tool-a1", "name": "weather",
                                             "input": {}}
    assert payloads[15]["delta"]["partial_json"] == '{"city": "Tromsø", "note": "é"}'
    assert payloads[-2] == {"type": "message_delta", "delta": {"stop_reason": "tool_use", "stop_sequence": None},
                            "usage": {"input_tokens": 8, "output_tokens": 18, "cache_read_input_tokens": 32}}
    assert payloads[-1] == {"type": "message_stop"}
    assert translator.usage == {"input_tokens": 8, "output_tokens": 18, "cache_read_input_tokens": 32}
    assert translator.done and translator.error is None
    assert translator.events == 10  # the chunks with content: 2 reasoning, 2 text, 6 tool-call fragments


def test_exact_bytes_of_a_short_text_stream():
    stream = b"".join([chunk({"role": "assistant", "content": ""}), chunk({"content": "Hé"}),
                       chunk({}, finish="stop", stop_reason=None),
                       chunk(choices=False, usage={"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}),
                       DONE])
    translator, out = translate(stream, message_id="msg_given")
    assert out == (
        b'event: message_start\ndata: {"type":"message_start","message":{"id":"msg_given","type":"message",'
        b'"role":"assistant","model":"qwen3","content":[],"stop_reason":null,"stop_sequence":null,'
        b'"usage":{"input_tokens":0,"output_tokens":0}}}\n\n'
        b'event: ping\ndata: {"type":"ping"}\n\n'
        b'event: content_block_start\ndata: {"type":"content_block_start","index":0,'
        b'"content_block":{"type":"text","text":""}}\n\n'
        b'event: content_block_delta\ndata: {"type":"content_block_delta","index":0,'
        b'"delta":{"type":"text_delta","text":"H\xc3\xa9"}}\n\n'
        b'event: content_block_stop\ndata: {"type":"content_block_stop","index":0}\n\n'
        b'event: message_delta\ndata: {"type":"message_delta","delta":{"stop_reason":"end_turn",'
        b'"stop_sequence":null},"usage":{"input_tokens":3,"output_tokens":1}}\n\n'
        b'event: message_stop\ndata: {"type":"message_stop"}\n\n')


@pytest.mark.parametrize("step", [1, 2, 3, 7, 61, 200])
def test_any_split_of_the_upstream_bytes_gives_the_same_events(step):
    whole = translate(b"".join(FULL))[1]
    translator, out = translate(b"".join(FULL), step=step)
    translator.finish()
    # Events only ever leave whole; ids are derived from the chunk id, so the bytes are identical.
    assert out == whole


def test_only_whole_events_leave_even_cut_inside_a_utf8_character():
    stream = b"".join(FULL)
    cut = stream.index("é".encode()) + 1  # between the two bytes of "é"
    translator = ChatToMessagesStream(MODEL)
    first = translator.feed(stream[:cut])
    assert first.endswith(b"\n\n") and "é".encode() not in first
    first.decode("utf-8")
    rest = translator.feed(stream[cut:])
    assert first + rest == translate(stream)[1]


def test_missing_done_is_incomplete():
    translator, out = translate(b"".join(FULL[:-1]))
    assert b"message_stop" not in out and b"message_delta" not in out
    with pytest.raises(StreamIncomplete, match=r"\[DONE\]"):
        translator.finish()
    translator, _ = translate(b"".join(FULL) [:-3])  # ends inside the [DONE] event
    with pytest.raises(StreamIncomplete, match="inside an event"):
        translator.finish()


def test_an_in_band_error_ends_the_stream_without_message_stop():
    error = b'data: {"error": {"message": "CUDA out of memory", "type": "InternalServerError", "code": 500}}\n\n'
    translator, out = translate(b"".join(FULL[:4]) + error + DONE + chunk({"content": "late"}))
    translator.finish()
    events = events_of(out)
    assert events[-1] == ("error", {"type": "error", "error": {"type": "api_error", "message": "CUDA out of memory"}})
    assert [k for k, _ in events].count("message_stop") == 0 and b"late" not in out
    assert translator.done and translator.error["message"] == "CUDA out of memory"
    # An error before anything else is the whole stream.
    translator, out = translate(b'data: {"error": "boom"}\n\n')
    assert events_of(out) == [("error", {"type": "error", "error": {"type": "api_error", "message": "boom"}})]


@pytest.mark.parametrize("code, kind", [(503, "overloaded_error"), (429, "rate_limit_error"),
                                         (400, "invalid_request_error"), ("server_error", "api_error"), (None, "api_error")])
def test_an_in_band_errors_type_follows_its_code(code, kind):
    error = jsonutil.dumps({"error": {"message": "no", "type": "X", "code": code}})
    _, out = translate(b"".join(FULL[:4]) + b"data: " + error + b"\n\n")
    assert events_of(out)[-1] == ("error", {"type": "error", "error": {"type": kind, "message": "no"}})


def test_a_matched_stop_string_and_reasoning_content_deltas():
    stream = b"".join([chunk({"reasoning_content": "hm"}), chunk({"content": "1, 2, 3"}),
                       chunk({}, finish="stop", stop_reason="4"), DONE])
    translator, out = translate(stream)
    events = events_of(out)
    assert events[2][1]["delta"] == {"type": "thinking_delta", "thinking": "hm"}
    assert events[-2][1] == {"type": "message_delta", "delta": {"stop_reason": "stop_sequence", "stop_sequence": "4"},
                             "usage": {"output_tokens": 0}}
    assert translator.usage is None  # no usage chunk: the exchange estimates from events


def test_length_and_usage_on_the_first_chunk():
    usage = {"prompt_tokens": 9, "completion_tokens": 0, "total_tokens": 9}
    stream = b"".join([chunk({"role": "assistant", "content": "a"}, usage=usage),
                       chunk({"content": "b"}, finish="length",
                             usage={"prompt_tokens": 9, "completion_tokens": 2, "total_tokens": 11}), DONE])
    events = events_of(translate(stream)[1])
    assert events[0][1]["message"]["usage"] == {"input_tokens": 9, "output_tokens": 0}
    assert events[-2][1]["delta"]["stop_reason"] == "max_tokens"
    assert events[-2][1]["usage"] == {"input_tokens": 9, "output_tokens": 2}


def test_text_during_a_tool_call_comes_after_it():
    stream = b"".join([chunk(tool_delta(0, "c1", "f", '{"a":')), chunk({"content": "aside"}),
                       chunk(tool_delta(0, arguments=" 1}")), chunk({"content": " more"}),
                       chunk(tool_delta(1, "c2", "g", "{}")), chunk({}, finish="tool_calls"), DONE])
    events = events_of(translate(stream)[1])
    shape = [(k, p.get("index"), (p.get("delta") or p.get("content_block") or {}).get("type")) for k, p in events]
    assert shape == [
        ("message_start", None, None),
        ("content_block_start", 0, "tool_use"), ("content_block_delta", 0, "input_json_delta"),
        ("content_block_delta", 0, "input_json_delta"), ("content_block_stop", 0, None),
        ("content_block_start", 1, "text"), ("content_block_delta", 1, "text_delta"),
        ("content_block_stop", 1, None),
        ("content_block_start", 2, "tool_use"), ("content_block_delta", 2, "input_json_delta"),
        ("content_block_stop", 2, None), ("message_delta", None, None), ("message_stop", None, None)]
    assert events[6][1]["delta"]["text"] == "aside more"


def assert_one_block_at_a_time(events):
    """Anthropic's block order: a start only when no block is open, deltas and the stop to the open one."""
    open_block, seen = None, 0
    for kind, payload in events:
        if kind == "content_block_start":
            assert open_block is None and payload["index"] == seen, (kind, payload)
            open_block, seen = payload["index"], seen + 1
        elif kind in ("content_block_delta", "content_block_stop"):
            assert payload["index"] == open_block, (kind, payload)  # never after its block's stop
            if kind == "content_block_stop":
                open_block = None
    assert open_block is None


def test_interleaved_tool_call_fragments_never_follow_their_blocks_stop():
    # An upstream that interleaves two calls' argument fragments, with reasoning and text among them.
    stream = b"".join([
        chunk({"role": "assistant", "content": ""}), chunk({"content": "Looking."}),
        chunk(tool_delta(0, "c1", "weather", "")), chunk(tool_delta(1, "c2", "time", "")),
        chunk(tool_delta(0, arguments='{"city": ')), chunk(tool_delta(1, arguments='{"zone": ')),
        chunk({"reasoning": "hm"}), chunk({"content": "aside"}),
        chunk(tool_delta(0, arguments='"Paris"}')), chunk(tool_delta(1, arguments='"CET"}')),
        chunk({}, finish="tool_calls"), chunk(choices=False, usage=USAGE), DONE])
    for step in (None, 5):
        translator, out = translate(stream, step=step)
        translator.finish()
        events = events_of(out)
        for _, payload in events:
            EVENT.validate_python(payload)
        assert_one_block_at_a_time(events)
        blocks = {}
        for kind, payload in events:
            if kind == "content_block_start":
                blocks[payload["index"]] = [payload["content_block"], ""]
            elif kind == "content_block_delta":
                delta = payload["delta"]
                blocks[payload["index"]][1] += delta.get("partial_json") or delta.get("text") or \
                    delta.get("thinking") or ""
        assert [(block["type"], block.get("name"), text) for block, text in blocks.values()] == [
            ("text", None, "Looking."),
            ("tool_use", "weather", '{"city": "Paris"}'),  # streamed live, open to the end
            ("thinking", None, "hm"), ("text", None, "aside"),  # held while it was open
            ("tool_use", "time", '{"zone": "CET"}')]  # held, then whole
        assert events[-2][1]["delta"]["stop_reason"] == "tool_use"


def test_the_full_stream_opens_one_block_at_a_time():
    assert_one_block_at_a_time(events_of(translate(b"".join(FULL))[1]))


def test_a_tool_call_whose_name_comes_late():
    stream = b"".join([chunk(tool_delta(0, "c1", None, '{"q"')), chunk(tool_delta(0, name="search")),
                       chunk(tool_delta(0, arguments=': "x"}')), chunk({}, finish="tool_calls"), DONE])
    events = events_of(translate(stream)[1])
    assert events[1][1]["content_block"] == {"type": "tool_use", "id": "c1", "name": "search", "input": {}}
    assert [p["delta"]["partial_json"] for k, p in events if k == "content_block_delta"] == ['{"q"', ': "x"}']


def test_an_empty_stream_is_still_a_message():
    """With its one empty text block, as a whole answer without content has (chat_to_message)."""
    translator, out = translate(DONE)
    assert [k for k, _ in events_of(out)] == ["message_start", "content_block_start", "content_block_stop",
                                              "message_delta", "message_stop"]
    assert events_of(out)[1][1]["content_block"] == {"type": "text", "text": ""}
    assert events_of(out)[0][1]["message"]["id"].startswith("msg_")


def test_tool_call_deltas_with_odd_indexes_and_ids_are_still_translated():
    stream = [chunk({"tool_calls": [{"index": [0], "id": 5, "function": {"name": "f", "arguments": "{}"}}]}),
              chunk({"content": ""}, finish="tool_calls"), DONE]
    events = events_of(translate(b"".join(stream))[1])
    start = [p for kind, p in events if kind == "content_block_start"][0]["content_block"]
    assert start["type"] == "tool_use" and start["id"].startswith("toolu_") and start["name"] == "f"
    for _, payload in events:
        EVENT.validate_python(payload)


def test_whole_tool_calls_without_an_index_stay_apart():
    # Servers that send each call whole in one chunk and leave "index" out (Gemini's OpenAI compatibility).
    def whole(call_id, name, arguments):
        return {"tool_calls": [{"id": call_id, "type": "function",
                                "function": {"name": name, "arguments": arguments}}]}
    stream = [chunk(whole("call_a", "weather", '{"city": "Paris"}')),
              chunk(whole("call_b", "time", '{"zone": "CET"}')),
              chunk({"tool_calls": [{"function": {"arguments": ""}}]}),  # a fragment with neither: the last call's
              chunk({"content": ""}, finish="tool_calls"), DONE]
    events = events_of(translate(b"".join(stream))[1])
    starts = [p["content_block"] for kind, p in events if kind == "content_block_start"]
    assert [(b["id"], b["name"]) for b in starts] == [("call_a", "weather"), ("call_b", "time")]
    deltas = [(p["index"], p["delta"]["partial_json"]) for kind, p in events if kind == "content_block_delta"]
    assert deltas == [(0, '{"city": "Paris"}'), (1, '{"zone": "CET"}')]
    assert events[-2][1]["delta"]["stop_reason"] == "tool_use"


def test_a_whole_answer_as_events():
    chat = chat_answer({"reasoning": "Hm.", "content": "Voilà", "tool_calls": [call("c1", "f", '{"a": 1}')]},
                       finish="tool_calls")
    events = events_of(chat_to_events_bytes(jsonutil.dumps(chat), MODEL))
    for _, payload in events:
        EVENT.validate_python(payload)
    assert [kind for kind, _ in events] == ["message_start"] + [
        "content_block_start", "content_block_delta", "content_block_delta", "content_block_stop",
        "content_block_start", "content_block_delta", "content_block_stop",
        "content_block_start", "content_block_delta", "content_block_stop", "message_delta", "message_stop"]
    assert events[0][1]["message"]["content"] == [] and events[0][1]["message"]["usage"]["output_tokens"] == 0
    assert events[-2][1] == {"type": "message_delta", "delta": {"stop_reason": "tool_use", "stop_sequence": None},
                             "usage": {"input_tokens": 12, "output_tokens": 5}}
    assert events[9][1]["delta"] == {"type": "input_json_delta", "partial_json": '{"a":1}'}
    empty = events_of(chat_to_events_bytes(jsonutil.dumps(chat_answer({"content": ""})), MODEL))
    assert [kind for kind, _ in empty][1:4] == ["content_block_start", "content_block_delta", "content_block_stop"]


def test_a_native_whole_answers_redacted_thinking_streams_whole_in_its_block_start():
    """A native answer that came whole to a stream becomes Anthropic's events: a C{redacted_thinking} block (or a type
    to come) whole in its C{content_block_start} and no delta, as Anthropic streams it, a C{tool_use} without its
    input as C{{}} (before: a KeyError, the stream a 502); a block that is no object is no answer."""
    from gomodel.anthropic.translate import message_events_bytes

    message = {"id": "msg_1", "type": "message", "role": "assistant", "model": MODEL, "stop_reason": "tool_use",
               "content": [{"type": "redacted_thinking", "data": "EmwKAhgB"},
                           {"type": "text", "text": "On it."},
                           {"type": "tool_use", "id": "toolu_1", "name": "f"}],
               "usage": {"input_tokens": 3, "output_tokens": 4}}
    events = events_of(message_events_bytes(jsonutil.dumps(message)))
    for _, payload in events:
        EVENT.validate_python(payload)
    assert [kind for kind, _ in events][1:8] == ["content_block_start", "content_block_stop", "content_block_start",
                                                 "content_block_delta", "content_block_stop", "content_block_start",
                                                 "content_block_delta"]
    assert events[1][1]["content_block"] == {"type": "redacted_thinking", "data": "EmwKAhgB"}
    assert events[7][1]["delta"] == {"type": "input_json_delta", "partial_json": "{}"}
    with pytest.raises(TypeError):
        message_events_bytes(jsonutil.dumps(dict(message, content=["text"])))


def test_it_is_a_stream_observer():
    assert verifyObject(IStreamObserver, ChatToMessagesStream(MODEL))
    assert verifyObject(IStreamObserver, MessagesStreamObserver())


# -- the native stream observed -------------------------------------------------


def native_event(kind, **fields):
    return b"event: " + kind.encode() + b"\ndata: " + jsonutil.dumps({"type": kind, **fields}) + b"\n\n"


NATIVE = [
    native_event("message_start", message={"id": "msg_1", "type": "message", "role": "assistant", "content": [],
                                           "model": MODEL, "stop_reason": None, "stop_sequence": None,
                                           "usage": {"input_tokens": 7, "output_tokens": 0,
                                                     "cache_read_input_tokens": 16}}),
    native_event("ping"),
    native_event("content_block_start", index=0, content_block={"type": "text", "text": ""}),
    native_event("content_block_delta", index=0, delta={"type": "text_delta", "text": "héllo"}),
    native_event("content_block_delta", index=0, delta={"type": "text_delta", "text": " error"}),
    native_event("content_block_stop", index=0),
    native_event("message_delta", delta={"stop_reason": "end_turn", "stop_sequence": None},
                 usage={"input_tokens": 7, "output_tokens": 2, "cache_creation_input_tokens": None}),
    native_event("message_stop"),
]


def test_native_stream_is_relayed_untouched_and_observed():
    stream = b"".join(NATIVE)
    observer = MessagesStreamObserver()
    out = b"".join(observer.feed(stream[i:i + 5]) for i in range(0, len(stream), 5))
    assert out == stream
    observer.finish()
    assert observer.done and observer.error is None and observer.events == 2
    assert observer.usage == {"input_tokens": 7, "output_tokens": 2, "cache_read_input_tokens": 16}


def test_whole_events_are_named_where_each_begins_with_its_event_line():
    """The native stream's quick way (L{_named}: only the watched events cut out) is for whole events that each
    begin with their C{event:} line; any other (a C{data:} line first, a comment) takes the way of every event."""
    from gomodel.anthropic.translate import _named
    stream = b"".join(NATIVE)
    assert _named(stream) and _named(NATIVE[0]) and not _named(b"")
    for unnamed in (b"data: {}\n\n", b": keep-alive\n\n", b"id: 1\ndata: {}\n\n"):
        assert not _named(NATIVE[0] + unnamed + NATIVE[1])
        for events in (unnamed + stream, stream + unnamed):
            assert not _named(events), events
            observer = MessagesStreamObserver()
            assert observer.feed(events) == events and observer.events == 2 and observer.done


def test_native_stream_without_message_stop_is_incomplete():
    observer = MessagesStreamObserver()
    observer.feed(b"".join(NATIVE[:-1]))
    assert observer.usage["output_tokens"] == 2 and not observer.done
    with pytest.raises(StreamIncomplete, match="message_stop"):
        observer.finish()
    observer = MessagesStreamObserver()
    observer.feed(b"".join(NATIVE)[:-4])
    with pytest.raises(StreamIncomplete, match="inside an event"):
        observer.finish()


def test_native_error_event_ends_the_stream():
    observer = MessagesStreamObserver()
    error = native_event("error", error={"type": "overloaded_error", "message": "Overloaded"})
    assert observer.feed(b"".join(NATIVE[:4]) + error) == b"".join(NATIVE[:4]) + error
    observer.finish()
    assert observer.done and observer.error == {"type": "overloaded_error", "message": "Overloaded"}
    # (no message_delta said the output: the one delta relayed, estimated)
    assert observer.usage == {"input_tokens": 7, "output_tokens": 1, "cache_read_input_tokens": 16}
    assert observer.estimated


def test_a_native_stream_cut_before_its_message_delta_counts_its_deltas_as_output():
    """message_start says 0 output tokens (vLLM; Anthropic 1): before, a stream cut after its text (the client
    left, the upstream broke off) was recorded and charged with that, nothing for what it made."""
    observer = MessagesStreamObserver()
    observer.feed(b"".join(NATIVE[:5]))
    assert observer.usage == {"input_tokens": 7, "output_tokens": 2, "cache_read_input_tokens": 16}
    assert observer.estimated
    observer.feed(b"".join(NATIVE[5:]))  # its message_delta: the upstream's count, not an estimate
    assert observer.usage["output_tokens"] == 2 and not observer.estimated
    nothing = MessagesStreamObserver()
    nothing.feed(NATIVE[0])
    assert nothing.usage["output_tokens"] == 0 and not nothing.estimated


def test_a_native_error_event_of_vllms_own_type_is_anthropics_without_the_address():
    observer = MessagesStreamObserver(hide=lambda message: message.replace("10.0.0.7:8000", "vllm"))
    error = native_event("error", error={"type": "internal_error", "message": "died at 10.0.0.7:8000"})
    out = b"".join(observer.feed(part) for part in (b"".join(NATIVE[:4]) + error[:9], error[9:]))
    assert out == b"".join(NATIVE[:4]) + native_event("error", error={"type": "api_error", "message": "died at vllm"})
    assert observer.done and observer.error["type"] == "internal_error"  # (what the upstream said, for the log)


def _without_event_lines(event: bytes) -> bytes:
    return event[event.index(b"\n") + 1:]


@pytest.mark.parametrize("shape", ["event lines", "data only", "mixed", "crlf"])
def test_a_native_stream_read_whole_is_observed_as_read_event_by_event(shape):
    """A stream's events in one read (a fast model's, or a stream's tail) are observed as in many: those found by
    their event line (vLLM's and Anthropic's way), or each looked into where an event has none."""
    events = list(NATIVE)
    if shape == "data only":
        events = [_without_event_lines(event) for event in events]
    elif shape == "mixed":
        events[-1] = _without_event_lines(events[-1])  # (a message_stop only its data names)
    elif shape == "crlf":
        events = [event.replace(b"\n", b"\r\n") for event in events]
    stream = b"".join(events)
    for reads in ([stream], [stream[:len(events[0]) + 3], stream[len(events[0]) + 3:]]):
        observer = MessagesStreamObserver()
        assert b"".join(observer.feed(read) for read in reads) == stream
        observer.finish()
        assert observer.done and observer.error is None and observer.events == 2 and not observer.estimated
        assert observer.usage == {"input_tokens": 7, "output_tokens": 2, "cache_read_input_tokens": 16}


def test_a_native_stream_read_whole_has_its_error_event_rewritten_and_its_aborted_end_cut():
    error = native_event("error", error={"type": "internal_error", "message": "died at 10.0.0.7:8000"})
    observer = MessagesStreamObserver(hide=lambda message: message.replace("10.0.0.7:8000", "vllm"))
    assert observer.feed(b"".join(NATIVE[:5]) + error) == b"".join(NATIVE[:5]) + native_event(
        "error", error={"type": "api_error", "message": "died at vllm"})
    assert observer.done and observer.error["type"] == "internal_error" and observer.events == 2
    aborted = native_event("message_delta", delta={"stop_reason": None}, usage={"output_tokens": 2})
    observer = MessagesStreamObserver()
    out = observer.feed(b"".join(NATIVE[:5]) + aborted + NATIVE[3] + NATIVE[-1])
    assert out == b"".join(NATIVE[:5]) + native_event("error", error={"type": "api_error", "message": NO_STOP_REASON})
    assert observer.done and observer.events == 2  # (nothing after the cut is relayed nor counted)
    assert observer.feed(NATIVE[-1]) == b""


def test_a_native_stream_read_whole_leaves_out_thinking_deltas_when_asked():
    thinking = [native_event("content_block_start", index=0, content_block={"type": "thinking", "thinking": ""}),
                native_event("content_block_delta", index=0, delta={"type": "thinking_delta", "thinking": "hm"}),
                native_event("content_block_stop", index=0)]
    events = NATIVE[:2] + thinking + NATIVE[2:]
    observer = MessagesStreamObserver(omit_thinking=True)
    assert observer.feed(b"".join(events)) == b"".join(event for event in events if event is not thinking[1])
    assert observer.done and observer.events == 3


# -- the official SDK reads what the translation makes --------------------------


class _MessagesServer(Resource):
    """C{POST /v1/messages}: translates the SDK's request (kept in C{requests}) and answers C{answer(chat)}."""

    isLeaf = True

    def __init__(self):
        super().__init__()
        self.requests = []
        self.answer = None  # chat request -> (status, content type, body)

    def render_POST(self, request):
        assert request.path == b"/v1/messages"
        chat = messages_to_chat(jsonutil.loads(request.content.read()))
        self.requests.append(chat)
        status, content_type, body = self.answer(chat)
        request.setResponseCode(status)
        request.setHeader(b"content-type", content_type)
        return body


@pytest_twisted.async_yield_fixture()
async def sdk(reactor):
    """The anthropic SDK and the L{_MessagesServer} it talks to, on 127.0.0.1:<free port>."""
    resource = _MessagesServer()
    site = server.Site(resource)
    site.noisy = False
    port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(site)
    client = anthropic.Anthropic(base_url=f"http://127.0.0.1:{port.getHost().port}", api_key="x", max_retries=0,
                                 timeout=10)
    yield client, resource
    await in_thread(client.close)
    await port.stopListening()


def _stream(client, **kwargs):
    with client.messages.stream(**kwargs) as stream:
        texts = list(stream.text_stream)
        return texts, stream.get_final_message()


@pytest_twisted.ensureDeferred
async def test_sdk_assembles_the_translated_stream(sdk):
    client, resource = sdk
    resource.answer = lambda chat: (200, b"text/event-stream", translate(b"".join(FULL))[1])
    texts, final = await in_thread(
        _stream, client, model=MODEL, max_tokens=2048, system="Be brief.",
        thinking={"type": "enabled", "budget_tokens": 1024},
        tools=[{"name": "weather", "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}}}],
        messages=[{"role": "user", "content": "Weather in Paris and Tromsø?"}])
    assert resource.requests[0]["stream"] is True
    assert resource.requests[0]["chat_template_kwargs"] == {"enable_thinking": True}
    assert resource.requests[0]["messages"][0] == {"role": "system", "content": "Be brief."}
    assert "".join(texts) == "Je regarde la météo."
    assert [b.type for b in final.content] == ["thinking", "text", "tool_use", "tool_use"]
    assert final.content[0].thinking == "The user wants two cities 🌍." and final.content[0].signature == ""
    assert (final.content[2].id, final.content[2].name, final.content[2].input) == (
        "chatcmpl-tool-a1", "weather", {"city": "Paris"})
    assert final.content[3].input == {"city": "Tromsø", "note": "é"}
    assert final.stop_reason == "tool_use" and final.stop_sequence is None
    assert (final.usage.input_tokens, final.usage.output_tokens, final.usage.cache_read_input_tokens) == (8, 18, 32)
    assert final.id == "msg_b1e2" and final.model == MODEL and final.role == "assistant"


@pytest_twisted.ensureDeferred
async def test_sdk_reads_the_translated_answer(sdk):
    client, resource = sdk
    chat = chat_answer({"reasoning": "Short.", "content": "Voilà",
                        "tool_calls": [call("chatcmpl-tool-9", "weather", '{"city": "Nice"}')]},
                       finish="tool_calls", usage={"prompt_tokens": 30, "completion_tokens": 9, "total_tokens": 39,
                                                   "prompt_tokens_details": {"cached_tokens": 16}})
    resource.answer = lambda request: (200, b"application/json", chat_to_message_bytes(jsonutil.dumps(chat), MODEL))
    message = await in_thread(client.messages.create, model=MODEL, max_tokens=64, stop_sequences=["###"],
                              messages=[{"role": "user", "content": "Weather in Nice?"}])
    assert resource.requests[0]["stop"] == ["###"] and "stream" not in resource.requests[0]
    assert isinstance(message, anthropic.types.Message)
    assert [type(b).__name__ for b in message.content] == ["ThinkingBlock", "TextBlock", "ToolUseBlock"]
    assert message.content[2].input == {"city": "Nice"} and message.stop_reason == "tool_use"
    assert (message.usage.input_tokens, message.usage.output_tokens, message.usage.cache_read_input_tokens) == (
        14, 9, 16)


@pytest_twisted.ensureDeferred
async def test_sdk_sees_an_in_band_error_and_an_error_answer(sdk):
    client, resource = sdk
    error = b'data: {"error": {"message": "engine died", "type": "InternalServerError", "code": 500}}\n\n'
    resource.answer = lambda chat: (200, b"text/event-stream", translate(b"".join(FULL[:5]) + error)[1])
    with pytest.raises(anthropic.APIStatusError, match="engine died"):
        await in_thread(_stream, client, model=MODEL, max_tokens=8, messages=[{"role": "user", "content": "Hi"}])
    upstream = b'{"error": {"message": "Too many requests", "type": "RateLimitError", "code": 429}}'
    resource.answer = lambda chat: (429, b"application/json", openai_error_to_anthropic(429, upstream))
    with pytest.raises(anthropic.RateLimitError) as caught:
        await in_thread(client.messages.create, model=MODEL, max_tokens=8, messages=[{"role": "user", "content": "Hi"}])
    assert caught.value.body == {"type": "error", "error": {"type": "rate_limit_error", "message": "Too many requests"}}


def test_a_translated_stream_idle_before_its_first_chunk_starts_the_message_then_pings():
    """While the upstream is silent before its first chunk (a long prefill), the stream's keepalive starts the
    message (its id the gateway's, input tokens 0) with its ping, then pings; the chunks then go on without a second
    message_start, and the SDK accumulates the whole message, its input tokens from message_delta."""
    from anthropic.lib.streaming._messages import accumulate_event
    translator = ChatToMessagesStream(MODEL, keepalive=10.0)
    assert translator.keepalive == 10.0
    started = translator.idle()
    assert translator.idle() == PING
    out = started + translator.feed(b"".join(FULL))
    translator.finish()
    assert translator.idle() is None  # (over: nothing more)
    events = events_of(out)
    assert [kind for kind, _ in events].count("message_start") == 1
    assert events[0][1]["message"]["id"].startswith("msg_") and events[0][1]["message"]["model"] == MODEL
    assert events[0][1]["message"]["usage"] == {"input_tokens": 0, "output_tokens": 0}
    message = None
    for _, payload in events:
        EVENT.validate_python(payload)
        message = accumulate_event(event=payload, current_snapshot=message, json_bufs={})
    assert (message.usage.input_tokens, message.usage.cache_read_input_tokens, message.usage.output_tokens) == (8, 32, 18)
    assert [block.type for block in message.content] == ["thinking", "text", "tool_use", "tool_use"]


def test_a_native_stream_pings_before_and_after_message_start_until_its_end():
    """A native stream's keepalive is a ping, before vLLM's message_start too (its prefill: the SDKs skip a ping
    wherever it comes), none once the stream ended or failed."""
    observer = MessagesStreamObserver(keepalive=10.0)
    assert observer.keepalive == 10.0 and observer.idle() == PING
    observer.feed(b'event: message_start\ndata: {"type":"message_start","message":{"id":"msg_1","usage":'
                  b'{"input_tokens":3,"output_tokens":0}}}\n\n')
    assert observer.idle() == PING
    observer.feed(b'event: error\ndata: {"type":"error","error":{"type":"overloaded_error","message":"busy"}}\n\n')
    assert observer.idle() is None


def test_tool_names_past_64_characters_go_short_without_changing_what_other_targets_share():
    """L{fit_tool_names} shortens the tools', the tool choice's and the past calls' names past OpenAI's 64
    characters, each long name always to the same short one, in new objects only (the body another target is sent
    keeps the names); L{long_names} maps them back; a short name is left as it is."""
    from gomodel.translate.call_ids import OPENAI_NAME_MAX, fit_tool_names, long_names, short_name
    long, other = "mcp__" + "x" * 70, "mcp__" + "x" * 60 + "y" * 10
    chat = messages_to_chat(request(
        tools=[{"name": long, "input_schema": {}}, {"name": other, "input_schema": {}}, {"name": "f", "input_schema": {}}],
        tool_choice={"type": "tool", "name": long},
        messages=[{"role": "user", "content": "go"},
                  {"role": "assistant", "content": [{"type": "tool_use", "id": "t1", "name": long, "input": {}}]},
                  {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1", "content": "ok"}]}]))
    kept = jsonutil.dumps(chat)
    sent = dict(chat)
    fit_tool_names(sent)
    assert jsonutil.dumps(chat) == kept
    names = [tool["function"]["name"] for tool in sent["tools"]]
    assert names == [short_name(long), short_name(other), "f"] and len(set(names)) == 3
    assert all(len(name) <= OPENAI_NAME_MAX for name in names) and short_name(long) == short_name(long)
    assert sent["tool_choice"]["function"]["name"] == short_name(long)
    assert sent["messages"][1]["tool_calls"][0]["function"]["name"] == short_name(long)
    assert long_names(chat) == {short_name(long): long, short_name(other): other}
    assert long_names(messages_to_chat(request(tools=[{"name": "f", "input_schema": {}}]))) is None


# -- stop sequences past the four that OpenAI (and others) take ------------------------------------------

FIVE_STOPS = ["w", "x", "y", "z", "END"]


def test_stop_sequences_past_four_are_watched_for_in_a_whole_answer():
    """OpenAI takes at most four stop sequences (a 400 past them; Anthropic takes more): it is sent four, and the
    answer is cut at the first of the others it holds, C{stop_sequence} naming it, as Anthropic's would end."""
    from gomodel.anthropic.translate import unsent_stops
    assert unsent_stops(request(stop_sequences=FIVE_STOPS)) == ["END"]
    assert unsent_stops(request(stop_sequences=FIVE_STOPS[:4])) is None and unsent_stops(request()) is None
    assert unsent_stops(request(stop_sequences=FIVE_STOPS[:4] + ["", "STOP", "END"])) == ["STOP", "END"]
    answer = {"id": "chatcmpl-1", "choices": [{"index": 0, "finish_reason": "length", "message": {
        "role": "assistant", "content": "Done. END and more", "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]}}]}
    message = chat_to_message(answer, MODEL, stops=["more", "END"])
    assert message["content"] == [{"type": "text", "text": "Done. "}]
    assert (message["stop_reason"], message["stop_sequence"]) == ("stop_sequence", "END")
    # Not there: the answer as it came.
    message = chat_to_message(answer, MODEL, stops=["STOP"])
    assert message["content"][0]["text"] == "Done. END and more" and message["stop_reason"] == "max_tokens"
    events = events_of(chat_to_events_bytes(jsonutil.dumps(answer), MODEL, stops=["END"]))
    assert events[-2][1]["delta"] == {"stop_reason": "stop_sequence", "stop_sequence": "END"}


def _texts(events):
    return "".join(p["delta"]["text"] for kind, p in events
                   if kind == "content_block_delta" and p["delta"]["type"] == "text_delta")


def test_stop_sequences_past_four_are_watched_for_in_a_stream():
    """A stream is cut at the first unsent stop sequence, one split across chunks too: the text before it goes
    out, then the message's end (C{stop_sequence} naming it), and nothing the upstream sends after; text that
    could begin one is held only until it cannot, and goes out before a block that follows it."""
    stream = b"".join([chunk({"role": "assistant", "content": ""}), chunk({"content": "Hello E"}),
                       chunk({"content": "N"}), chunk({"content": "D and on"}), chunk({"content": " and on"}),
                       chunk({}, finish="length"), chunk(choices=False, usage=USAGE), DONE])
    for step in (None, 7):
        translator, out = translate(stream, step, stops=["END"])
        translator.finish()
        events = events_of(out)
        assert _texts(events) == "Hello "
        assert events[-2][1]["delta"] == {"stop_reason": "stop_sequence", "stop_sequence": "END"}
        assert [kind for kind, _ in events][-3:] == ["content_block_stop", "message_delta", "message_stop"]
        assert translator.done
    # Text that only begins one goes out whole, before the tool call's block and at the end.
    stream = b"".join([chunk({"content": "Calling E"}), chunk(tool_delta(0, "c1", "f", "{}")),
                       chunk({}, finish="tool_calls"), DONE])
    translator, out = translate(stream, stops=["END"])
    events = events_of(out)
    assert _texts(events) == "Calling E" and events[-2][1]["delta"]["stop_reason"] == "tool_use"
    assert [p["content_block"]["type"] for kind, p in events if kind == "content_block_start"] == ["text", "tool_use"]
    translator, out = translate(b"".join([chunk({"content": "Ends with EN"}), chunk({}, finish="stop"), DONE]),
                                stops=["END"])
    events = events_of(out)
    assert _texts(events) == "Ends with EN" and events[-2][1]["delta"]["stop_reason"] == "end_turn"


class _Reads(dict):
    """A body that notes the fields read from it."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.read = set()

    def get(self, name, default=None):
        self.read.add(name)
        return super().get(name, default)

    def __getitem__(self, name):
        self.read.add(name)
        return super().__getitem__(name)

    def __contains__(self, name):
        self.read.add(name)
        return super().__contains__(name)


def test_check_options_reads_what_its_checks_read_and_fails_as_they_do():
    """L{check_options} skips its checks for a body that sends none of its fields: given such a body, each reads
    nothing but those fields (a check that read another would be skipped for a body sending only that), and a body
    with any fails as its checks do, in their order, or says whether it omits thinking."""
    from gomodel.anthropic.translate import _CHECKED_FIELDS
    full = {"temperature": 0.5, "top_p": 0.5, "tools": [{"name": "f", "input_schema": {}}], "mcp_servers": [],
            "container": None, "metadata": {"user_id": "u"}, "tool_choice": {"type": "tool", "name": "f"},
            "thinking": {"type": "enabled", "budget_tokens": 1024, "display": "omitted"}}
    assert set(full) == _CHECKED_FIELDS
    others = {"model": "m", "max_tokens": 5, "system": [{"type": "text", "text": "s"}], "stop_sequences": ["x"],
              "messages": [{"role": "user", "content": "hi"}], "top_k": 5, "stream": True, "service_tier": "auto"}
    for check in (check_sampling, check_tool_names, refuse_server_side, check_tool_choice_and_metadata, thinking_kind,
                  omits_thinking):
        body = _Reads(others)
        check(body)
        assert body.read <= _CHECKED_FIELDS, (check.__name__, body.read - _CHECKED_FIELDS)
    assert check_options({"model": "m", "max_tokens": 5, "messages": []}) is False
    assert check_options(full) is True and check_options(dict(full, thinking={"type": "disabled"})) is False
    for bad, said in (({"temperature": 2, "tools": [{"type": "web_search_20250305"}]}, "temperature: "),
                      ({"tools": [{"type": "web_search_20250305"}], "tool_choice": {"type": "nope"}}, "tools.0: "),
                      ({"tool_choice": {"type": "any"}, "thinking": {"display": "x"}}, "tool_choice: "),
                      ({"metadata": 1}, "metadata: "), ({"thinking": {"display": "x"}}, "thinking.type: "),
                      ({"thinking": {"type": "enabled", "budget_tokens": 5, "display": "x"}}, "thinking.enabled."),
                      ({"thinking": {"type": "adaptive", "display": "x"}}, "thinking.display: ")):
        with pytest.raises(InvalidRequest) as raised:
            check_options(bad)
        assert raised.value.message.startswith(said), raised.value.message
