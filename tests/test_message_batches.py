"""Anthropic's Message Batches API (/v1/messages/batches): the official anthropic SDK against the gateway, in
front of a fake vLLM (its own Messages API) and an OpenAI-compatible fake (translated to chat)."""

import json
import sqlite3

import anthropic
import pytest
import pytest_twisted
import treq

from gomodel.anthropic.batches import result_line
from gomodel.store.records import process_owner
from gomodel.store.sweeps import StoreSweeper
from tests.fakes.vllm import CHAT_MODEL
from tests.support import in_thread, start_fake, start_gateway, stop_all

KEY = "message-batches-key"
NATIVE = f"vllm/{CHAT_MODEL}"
TRANSLATED = f"openai/{CHAT_MODEL}"
HELLO = [{"role": "user", "content": "Say hello."}]


def request(custom_id, model=NATIVE, **params):
    return {"custom_id": custom_id, "params": {"model": model, "max_tokens": 16, "messages": HELLO,
                                               "fake_marker": custom_id, **params}}


@pytest_twisted.async_yield_fixture()
async def setup(reactor, tmp_path):
    vllm = await start_fake(reactor)
    openai = await start_fake(reactor, messages=False)
    gw = await start_gateway(reactor, {"VLLM_BASE_URL": vllm.base_url, "OPENAI_BASE_URL": openai.base_url,
                                       "OPENAI_API_KEY": "sk-upstream", "GOMODEL_MASTER_KEY": KEY,
                                       "GOMODEL_DATA_DIR": str(tmp_path), "BATCH_CONCURRENCY_PER_PROVIDER": "2"})
    client = anthropic.Anthropic(base_url=gw.url, api_key=KEY, max_retries=0, timeout=10)
    yield gw, client, vllm, openai
    await stop_all(gw, vllm, openai, clients=(client,))


async def ended(gw, client, batch_id):
    await gw.service.batch_runner.settled(batch_id)
    return await in_thread(client.messages.batches.retrieve, batch_id)


async def results(client, batch_id):
    return await in_thread(lambda: {r.custom_id: r.result for r in client.messages.batches.results(batch_id)})


async def test_a_message_batch_runs_natively_and_translated_and_gives_anthropics_results(setup):
    gw, client, vllm, openai = setup
    made = await in_thread(client.messages.batches.create, requests=[
        request("native-1"), request("native-2", system="Be brief."), request("translated", model=TRANSLATED),
        request("refused", fake_status=400, fake_body=json.dumps(
            {"type": "error", "error": {"type": "invalid_request_error", "message": "max_tokens is too large"}}))])
    assert made.type == "message_batch" and made.processing_status == "in_progress"
    assert made.request_counts.processing == 4 and made.cancel_initiated_at is None
    assert made.results_url is None and made.expires_at > made.created_at
    batch = await ended(gw, client, made.id)
    assert batch.processing_status == "ended" and batch.ended_at is not None
    assert batch.request_counts.model_dump() == {"processing": 0, "succeeded": 3, "errored": 1, "canceled": 0,
                                                 "expired": 0}
    assert batch.results_url == f"/v1/messages/batches/{made.id}/results"
    got = await results(client, made.id)
    assert set(got) == {"native-1", "native-2", "translated", "refused"}
    for custom_id in ("native-1", "native-2", "translated"):
        assert got[custom_id].type == "succeeded"
        message = got[custom_id].message
        assert message.type == "message" and message.role == "assistant" and message.content[0].type == "text"
        assert message.usage.output_tokens > 0
    assert got["refused"].type == "errored"
    assert got["refused"].error.error.type == "invalid_request_error"
    assert got["refused"].error.error.message == "max_tokens is too large"
    # Natively to the vLLM's own Messages API (its model and the system prompt as sent), translated to the
    # OpenAI-compatible provider's chat completions; neither got the client's key.
    native = {r.body["fake_marker"]: r for r in vllm.requests if r.path == b"/v1/messages"}
    assert set(native) == {"native-1", "native-2", "refused"}
    assert native["native-2"].body["model"] == CHAT_MODEL and native["native-2"].body["system"] == "Be brief."
    [chat] = [r for r in openai.requests if r.path == b"/v1/chat/completions"]
    assert chat.body["model"] == CHAT_MODEL and chat.body["messages"] == [{"role": "user", "content": "Say hello."}]
    assert chat.body["max_completion_tokens"] == 16 and "max_tokens" not in chat.body  # as online (OpenAI's name)
    assert all(KEY not in (r.header(b"authorization") or "") for r in vllm.requests + openai.requests)
    # The batch as stored (OpenAI's routes do not show a message batch).
    stored = await gw.service.store.batches.get(made.id)
    assert (stored["endpoint"], stored["status"], stored["kind"]) == ("/v1/messages", "completed", "message_batch")
    assert (stored["total"], stored["completed"], stored["failed"]) == (4, 3, 1)


async def test_a_lines_thinking_display_omitted_is_honoured(setup):
    """A line asking for its thinking without its text (C{thinking.display: "omitted"}) gets its thinking block
    with an empty C{thinking}, as online, translated and natively (vLLM's answer holds the text: before, a native
    line's was its result as it came); another line its text; a display none of Anthropic's is the line's error."""
    gw, client, vllm, openai = setup
    thinking = {"type": "enabled", "budget_tokens": 1024}
    openai.steer = vllm.steer = {"fake_reasoning": "Secret plan."}
    made = await in_thread(client.messages.batches.create, requests=[
        request(f"{name}-{display}", model=model, max_tokens=2000, thinking=dict(thinking, display=display))
        for name, model in (("translated", TRANSLATED), ("native", NATIVE))
        for display in ("omitted", "summarized", "hidden")])
    await ended(gw, client, made.id)
    got = await results(client, made.id)
    for name in ("translated", "native"):  # (a display none of Anthropic's: the line's 400, as online)
        error = got[f"{name}-hidden"].error.error
        assert (error.type, error.message) == (
            "invalid_request_error", "thinking.display: 'hidden' is not one of 'summarized', 'omitted'"), name
    for name in ("translated", "native"):
        assert [(b.type, getattr(b, "thinking", None)) for b in got[f"{name}-omitted"].message.content] == [
            ("thinking", ""), ("text", None)], name
        assert got[f"{name}-summarized"].message.content[0].thinking == "Secret plan.", name
    assert got["native-omitted"].message.content[0].signature == "5f1c0ffee5f1c0ffee5f1c0ffee5f1c0"


async def test_a_lines_server_side_features_are_its_error_natively_too(setup):
    """A line with Anthropic's MCP connector or a code execution container is errored (invalid_request_error)
    natively as translated, as online: vLLM's Messages API would drop them unread. The other lines run."""
    gw, client, vllm, openai = setup
    made = await in_thread(client.messages.batches.create, requests=[
        request("mcp", mcp_servers=[{"type": "url", "url": "https://mcp.example/sse", "name": "e"}]),
        request("container", container="container_1"), request("fine")])
    await ended(gw, client, made.id)
    got = await results(client, made.id)
    assert got["fine"].type == "succeeded"
    for custom_id in ("mcp", "container"):
        assert got[custom_id].type == "errored" and got[custom_id].error.error.type == "invalid_request_error"
        assert got[custom_id].error.error.message.startswith(f"{'mcp_servers' if custom_id == 'mcp' else custom_id}: ")
    assert {r.body["fake_marker"] for r in vllm.requests if r.path == b"/v1/messages"} == {"fine"}


async def test_a_lines_empty_messages_or_sampling_out_of_bounds_are_its_error_natively_too(setup):
    """A line with no message, or a temperature or top_p outside 0 to 1, is errored (invalid_request_error, naming
    the field) natively as translated, as online; before, a native one went to vLLM as it was. The others run."""
    gw, client, vllm, openai = setup
    made = await in_thread(client.messages.batches.create, requests=[
        request("empty", messages=[]), request("hot", temperature=1.5), request("wide", top_p=-1),
        request("translated", model=TRANSLATED, messages=[]), request("fine")])
    await ended(gw, client, made.id)
    got = await results(client, made.id)
    assert got["fine"].type == "succeeded"
    for custom_id, field in (("empty", "messages"), ("hot", "temperature"), ("wide", "top_p"),
                             ("translated", "messages")):
        assert got[custom_id].type == "errored" and got[custom_id].error.error.type == "invalid_request_error"
        assert got[custom_id].error.error.message.startswith(f"{field}: ")
    assert {r.body["fake_marker"] for r in vllm.requests if r.path == b"/v1/messages"} == {"fine"}
    assert not openai.requests or all(r.path != b"/v1/chat/completions" for r in openai.requests)


async def test_a_lines_user_message_of_nothing_but_empty_text_is_its_error_natively_too(setup):
    """A line whose user message is nothing but empty text blocks is errored with Anthropic's words ("text content
    blocks must be non-empty") natively as translated, as online; before, a native one went to vLLM, which drops
    the empty block. The others run."""
    gw, client, vllm, openai = setup
    empty = [{"role": "user", "content": [{"type": "text", "text": ""}]}]
    made = await in_thread(client.messages.batches.create, requests=[
        request("native", messages=empty), request("translated", model=TRANSLATED, messages=empty), request("fine")])
    await ended(gw, client, made.id)
    got = await results(client, made.id)
    assert got["fine"].type == "succeeded"
    for custom_id in ("native", "translated"):
        assert got[custom_id].type == "errored" and got[custom_id].error.error.type == "invalid_request_error"
        assert got[custom_id].error.error.message == "messages: text content blocks must be non-empty"
    assert {r.body["fake_marker"] for r in vllm.requests if r.path == b"/v1/messages"} == {"fine"}


async def test_a_lines_blank_text_is_its_error_natively_too(setup):
    """A line whose message's text blocks are all whitespace, with an empty text block in a tool result, or whose
    system prompt holds an empty or blank text block is errored with Anthropic's words, natively as translated,
    as online (L{tests.test_messages.test_blank_text_is_anthropics_400_natively_and_translated}); before, a native
    one went to vLLM. The others run."""
    from tests.test_messages import _blank_requests

    await _lines_errored(setup, [({"messages": messages} if system is None else
                                  {"messages": messages, "system": system}, message)
                                 for system, messages, message in _blank_requests() if message is not None])


async def _lines_errored(setup, faults):
    """Assert that a batch of a fine line and, for each C{(params, message)} of C{faults}, a line of them for a vLLM
    (natively) and one translated, runs the fine line and errors each other with C{message}, no vLLM asked for
    them."""
    gw, client, vllm, openai = setup
    lines, said = [request("fine")], {}
    for i, (params, message) in enumerate(faults):
        lines += [request(f"native-{i}", **params), request(f"translated-{i}", model=TRANSLATED, **params)]
        said[f"native-{i}"] = said[f"translated-{i}"] = message
    made = await in_thread(client.messages.batches.create, requests=lines)
    await ended(gw, client, made.id)
    got = await results(client, made.id)
    assert got["fine"].type == "succeeded"
    for custom_id, message in said.items():
        assert got[custom_id].type == "errored" and got[custom_id].error.error.type == "invalid_request_error"
        assert got[custom_id].error.error.message == message, custom_id
    assert {r.body["fake_marker"] for r in vllm.requests if r.path == b"/v1/messages"} == {"fine"}


async def test_a_lines_unpaired_tool_calls_are_its_error_natively_too(setup):
    """A line whose tool calls and results do not pair is errored with Anthropic's words, natively as translated, as
    online (L{tests.test_messages.test_unpaired_tool_calls_and_results_are_anthropics_400_natively_and_translated});
    before, a native one went to vLLM. The others run."""
    from tests.test_messages import _unpaired_requests

    await _lines_errored(setup, [({"messages": messages}, message) for messages, message in _unpaired_requests()
                                 if message is not None])


async def test_a_line_with_several_faults_is_told_the_one_an_online_create_is(setup):
    """A line is checked as an online create is, in one order (L{gomodel.anthropic.translate.check_create}): of its
    faults, its error names the one a create's 400 names, natively and translated (before, a line's server tool or
    MCP connector was named before its empty messages or its sampling out of bounds, a create's after them)."""
    gw, client, vllm, openai = setup
    server = {"tools": [{"type": "web_search_20250305", "name": "web_search"}]}
    mcp = {"mcp_servers": [{"type": "url", "url": "https://mcp.example/sse", "name": "m"}]}
    faults = (dict(server, temperature=1.5), dict(server, messages=[]), dict(mcp, top_p=-1),
              dict(mcp, messages=[], temperature=2))
    lines, said = [request("fine")], {}
    for i, params in enumerate(faults):
        for model in (NATIVE, TRANSLATED):
            with pytest.raises(anthropic.BadRequestError) as caught:
                await in_thread(client.messages.create, model=model, max_tokens=16, messages=HELLO,
                                extra_body=params)
            custom_id = f"{i}-{'native' if model == NATIVE else 'translated'}"
            said[custom_id] = caught.value.body["error"]["message"]
            lines.append(request(custom_id, model=model, **params))
    made = await in_thread(client.messages.batches.create, requests=lines)
    await ended(gw, client, made.id)
    got = await results(client, made.id)
    assert got["fine"].type == "succeeded"
    for custom_id, message in said.items():
        assert got[custom_id].type == "errored" and got[custom_id].error.error.message == message, custom_id


async def test_a_lines_empty_user_message_is_its_error_natively_too(setup):
    """A line with an empty user message (C{""}, C{[]}) is errored with Anthropic's words ("messages.0: all
    messages must have non-empty content ...") natively as translated, as online; before, a native one went to
    vLLM. The others run."""
    gw, client, vllm, openai = setup
    made = await in_thread(client.messages.batches.create, requests=[
        request("string", messages=[{"role": "user", "content": ""}]),
        request("list", messages=[{"role": "user", "content": []}]),
        request("translated", model=TRANSLATED, messages=[{"role": "user", "content": ""}]), request("fine")])
    await ended(gw, client, made.id)
    got = await results(client, made.id)
    assert got["fine"].type == "succeeded"
    for custom_id in ("string", "list", "translated"):
        assert got[custom_id].type == "errored" and got[custom_id].error.error.type == "invalid_request_error"
        assert got[custom_id].error.error.message == ("messages.0: all messages must have non-empty content except "
                                                      "for the optional final assistant message")
    assert {r.body["fake_marker"] for r in vllm.requests if r.path == b"/v1/messages"} == {"fine"}


TOOLS = [{"name": "get_weather", "input_schema": {"type": "object"}}]


async def test_a_lines_tool_choice_naming_no_tool_or_user_id_no_string_is_its_error_natively_too(setup):
    """A line whose C{tool_choice} names a tool it does not declare, or whose C{metadata.user_id} is no string, is
    errored (invalid_request_error, naming the field) natively as translated, as online. The others run."""
    gw, client, vllm, openai = setup
    made = await in_thread(client.messages.batches.create, requests=[
        request("choice", tools=TOOLS, tool_choice={"type": "tool", "name": "nowhere"}),
        request("user", metadata={"user_id": 7}),
        request("translated", model=TRANSLATED, tools=TOOLS, tool_choice={"type": "tool", "name": "nowhere"}),
        request("fine")])
    await ended(gw, client, made.id)
    got = await results(client, made.id)
    assert got["fine"].type == "succeeded"
    for custom_id, field in (("choice", "tool_choice.name"), ("user", "metadata.user_id"),
                             ("translated", "tool_choice.name")):
        assert got[custom_id].type == "errored" and got[custom_id].error.error.type == "invalid_request_error"
        assert got[custom_id].error.error.message.startswith(f"{field}: ")
    assert {r.body["fake_marker"] for r in vllm.requests if r.path == b"/v1/messages"} == {"fine"}
    assert not openai.requests or all(r.path != b"/v1/chat/completions" for r in openai.requests)


async def test_a_translated_providers_errors_and_garbled_answers_are_errored_results(setup):
    gw, client, _, openai = setup
    outcomes = {}
    for name, steer in (("refused", {"fake_status": 400, "fake_body": json.dumps({"error": {
            "message": "bad temperature", "type": "invalid_request_error", "param": None, "code": None}})}),
                        ("garbled", {"fake_status": 200, "fake_body": '{"not": "a chat completion"}'})):
        openai.steer = steer
        made = await in_thread(client.messages.batches.create, requests=[request(name, model=TRANSLATED)])
        await ended(gw, client, made.id)
        outcomes[name] = (await results(client, made.id))[name]
    refused, garbled = outcomes["refused"], outcomes["garbled"]
    assert refused.type == "errored" and refused.error.type == "error"
    assert (refused.error.error.type, refused.error.error.message) == ("invalid_request_error", "bad temperature")
    assert garbled.type == "errored" and garbled.error.error.type == "api_error"
    assert "answered with something that is not a chat completion" in garbled.error.error.message


async def test_a_generation_vllm_aborted_is_an_errored_result_not_a_succeeded_one(setup):
    """vLLM's own Messages API tells an aborted generation only by its null stop_reason: the line is errored, as
    online (before: succeeded, with a message that looked finished and was cut)."""
    from tests.test_messages import _aborted_native_events

    gw, client, vllm, _ = setup
    made = await in_thread(client.messages.batches.create, requests=[
        request("aborted", fake_events=_aborted_native_events()), request("whole")])
    batch = await ended(gw, client, made.id)
    assert (batch.request_counts.succeeded, batch.request_counts.errored) == (1, 1)
    got = await results(client, made.id)
    assert got["whole"].type == "succeeded" and got["whole"].message.stop_reason == "max_tokens"
    assert got["aborted"].type == "errored" and got["aborted"].error.error.type == "api_error"
    assert "not whole" in got["aborted"].error.error.message


async def test_a_line_with_stop_sequences_goes_to_a_vllm_translated_as_online(setup):
    """vLLM's own Messages API does not name the stop sequence that ended an answer: such a line goes translated,
    as an online request does, and its result says stop_sequence and which one."""
    gw, client, vllm, _ = setup
    chat = {"id": "chatcmpl-s", "object": "chat.completion", "created": 1, "model": CHAT_MODEL, "choices": [
        {"index": 0, "message": {"role": "assistant", "content": "Hi"}, "finish_reason": "stop",
         "stop_reason": "END"}], "usage": {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}}
    vllm.steer = {"fake_status": 200, "fake_body": json.dumps(chat)}  # (a translated line carries no fake_ field)
    made = await in_thread(client.messages.batches.create, requests=[request("stopped", stop_sequences=["END"])])
    await ended(gw, client, made.id)
    message = (await results(client, made.id))["stopped"].message
    assert (message.stop_reason, message.stop_sequence) == ("stop_sequence", "END")
    assert [r.path for r in vllm.requests if r.method == b"POST"] == [b"/v1/chat/completions"]


async def test_a_line_with_a_document_goes_to_a_vllm_translated_as_online(setup):
    """vLLM's Messages API has no document block (it refuses one): a line holding one goes translated, as an
    online request does, and its document reaches the model as its text."""
    gw, client, vllm, _ = setup
    document = {"type": "document", "source": {"type": "text", "media_type": "text/plain", "data": "Notes."}}
    made = await in_thread(client.messages.batches.create, requests=[request("doc", messages=[
        {"role": "user", "content": [document, {"type": "text", "text": "Sum up."}]}])])
    await ended(gw, client, made.id)
    assert (await results(client, made.id))["doc"].type == "succeeded"
    [sent] = [r for r in vllm.requests if r.method == b"POST"]
    assert sent.path == b"/v1/chat/completions"
    assert sent.body["messages"] == [{"role": "user", "content": [{"type": "text", "text": "Notes."},
                                                                  {"type": "text", "text": "Sum up."}]}]


async def test_a_lines_failed_tool_result_tells_a_native_vllm_it_failed(setup):
    """vLLM's Messages API drops a tool_result's is_error: a native line says the failure in its text, as online."""
    gw, client, vllm, _ = setup
    messages = [{"role": "user", "content": "Weather?"}, {"role": "assistant", "content": [
        {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": "timed out",
                                      "is_error": True}]}]
    made = await in_thread(client.messages.batches.create, requests=[request("failed", messages=messages)])
    await ended(gw, client, made.id)
    assert (await results(client, made.id))["failed"].type == "succeeded"
    [sent] = [r for r in vllm.requests if r.method == b"POST"]
    assert sent.path == b"/v1/messages"
    assert sent.body["messages"][2]["content"][0]["content"] == "Error: timed out"


async def test_a_lines_tool_changes_go_to_a_vllm_translated_as_online(setup):
    """A system message's tool_addition and tool_removal blocks send a line to a vLLM translated, its tools resolved,
    as online (before: left out natively, so a removed tool was still offered)."""
    gw, client, vllm, _ = setup
    added = {"type": "tool_addition", "tool": {"type": "tool_reference", "name": "get_weather"}}
    tool = {"name": "get_weather", "input_schema": {"type": "object", "properties": {}}}
    messages = HELLO + [{"role": "assistant", "content": "Hello."},
                        {"role": "system", "content": [{"type": "text", "text": "A server connected."}, added]},
                        {"role": "user", "content": "Again."}]
    made = await in_thread(client.messages.batches.create,
                           requests=[request("changed", messages=messages, tools=[tool])])
    await ended(gw, client, made.id)
    assert (await results(client, made.id))["changed"].type == "succeeded"
    [sent] = [r for r in vllm.requests if r.method == b"POST"]
    assert sent.path == b"/v1/chat/completions"
    assert [t["function"]["name"] for t in sent.body["tools"]] == ["get_weather"]


async def test_bad_requests_are_refused_in_anthropics_shape_naming_the_request(setup):
    gw, client, vllm, _ = setup
    for requests, problem in (
            ([], "requests: a list of at least one request is required."),
            ([{"custom_id": "a b", "params": {}}], "requests.0.custom_id: 1 to 64 letters"),
            ([request("a"), request("a")], "requests.1.custom_id: 'a' is used by an earlier request"),
            ([request("a"), {"custom_id": "b"}], "requests.1.params: an object of Messages API parameters"),
            ([request("a", max_tokens=0)], "requests.0.params.max_tokens: a positive integer is required."),
            ([request("a", stream=True)], "requests.0.params.stream: batch requests cannot stream."),
            ([request("a", messages="hi")], "requests.0.params.messages: a list of messages is required.")):
        with pytest.raises(anthropic.BadRequestError) as raised:
            await in_thread(client.messages.batches.create, requests=requests)
        assert raised.value.body["type"] == "error"
        assert raised.value.body["error"]["type"] == "invalid_request_error"
        assert raised.value.body["error"]["message"].startswith(problem)
    with pytest.raises(anthropic.NotFoundError) as raised:
        await in_thread(client.messages.batches.create, requests=[request("a"), request("b", model="vllm/nobody")])
    assert raised.value.body["error"]["message"].startswith("requests.1.params.model: ")
    assert not [r for r in vllm.requests if r.path == b"/v1/messages"]  # nothing ran
    page = await in_thread(client.messages.batches.list)
    assert page.data == []


async def test_a_requests_provider_hint_routes_its_bare_model_as_online(setup):
    """A request's C{provider} (GoModel's routing hint) chooses which of the providers serving its bare model id it
    goes to, as on the online C{/v1/messages}: validated as that provider's model and sent there without it; one
    naming no configured provider, or no string, refuses the batch naming the request (before: the bare id two
    providers serve refused the batch as ambiguous, whatever the hint)."""
    gw, client, vllm, openai = setup
    online = await in_thread(client.messages.create, model=CHAT_MODEL, max_tokens=16, messages=HELLO,
                             extra_body={"provider": "openai"})
    assert online.type == "message"
    made = await in_thread(client.messages.batches.create, requests=[
        request("to-vllm", model=CHAT_MODEL, provider="vllm"), request("to-openai", model=CHAT_MODEL,
                                                                       provider="openai")])
    await ended(gw, client, made.id)
    got = await results(client, made.id)
    assert {custom_id: result.type for custom_id, result in got.items()} == {"to-vllm": "succeeded",
                                                                             "to-openai": "succeeded"}
    [native] = [r.body for r in vllm.requests if r.path == b"/v1/messages"]
    online_chat, chat = [r.body for r in openai.requests if r.path == b"/v1/chat/completions"]
    assert native["fake_marker"] == "to-vllm" and native["model"] == CHAT_MODEL and "provider" not in native
    assert chat["model"] == CHAT_MODEL and "provider" not in chat
    for hint, problem in (("nobody", "requests.1.params.provider: The provider 'nobody' is not configured"),
                          (1, "requests.1.params.provider: 'provider' must be a string")):
        with pytest.raises(anthropic.BadRequestError) as raised:
            await in_thread(client.messages.batches.create, requests=[
                request("a", model=CHAT_MODEL, provider="vllm"), request("b", model=CHAT_MODEL, provider=hint)])
        assert raised.value.body["error"]["type"] == "invalid_request_error"
        assert raised.value.body["error"]["message"].startswith(problem)


async def test_a_cancelled_batch_ends_with_its_requests_not_run_canceled(setup):
    gw, client, vllm, _ = setup
    made = await in_thread(client.messages.batches.create, requests=[
        request(f"r{i}", fake_hold=True) for i in range(5)])
    await vllm.when_held(2)  # (2 at a time per provider)
    cancelling = await in_thread(client.messages.batches.cancel, made.id)
    assert cancelling.processing_status == "canceling" and cancelling.cancel_initiated_at is not None
    batch = await ended(gw, client, made.id)
    assert batch.processing_status == "ended"
    assert batch.request_counts.canceled == 5 and batch.request_counts.succeeded == 0
    got = await results(client, made.id)
    assert {custom_id: r.type for custom_id, r in got.items()} == {f"r{i}": "canceled" for i in range(5)}
    again = await in_thread(client.messages.batches.cancel, made.id)  # nothing left to stop: as it is
    assert again.processing_status == "ended"


async def test_results_wait_for_the_end_and_an_ended_batch_can_be_deleted(setup):
    gw, client, vllm, _ = setup
    made = await in_thread(client.messages.batches.create, requests=[request("held", fake_hold=True)])
    with pytest.raises(anthropic.AnthropicError):  # (the SDK: no results_url yet)
        await results(client, made.id)
    raw = await treq.get(gw.url + f"/v1/messages/batches/{made.id}/results", headers={"x-api-key": KEY})
    assert raw.code == 400 and (await raw.json())["error"]["type"] == "invalid_request_error"
    with pytest.raises(anthropic.BadRequestError):
        await in_thread(client.messages.batches.delete, made.id)
    vllm.release_holds()
    await ended(gw, client, made.id)
    raw = await treq.get(gw.url + f"/v1/messages/batches/{made.id}/results", headers={"x-api-key": KEY})
    assert raw.code == 200 and raw.headers.getRawHeaders(b"content-type") == [b"application/x-jsonl"]
    files = await gw.service.store.files.list(limit=100)
    assert len(files[0]) == 2  # its requests and its output
    deleted = await in_thread(client.messages.batches.delete, made.id)
    assert deleted.id == made.id and deleted.type == "message_batch_deleted"
    with pytest.raises(anthropic.NotFoundError):
        await in_thread(client.messages.batches.retrieve, made.id)
    assert (await gw.service.store.files.list(limit=100))[0] == []


async def test_a_message_batchs_requests_file_is_the_gateways_own_not_the_files_apis(setup):
    """A message batch's input file (its requests as batch lines) is internal: C{/v1/files} neither lists,
    shows, serves nor deletes it, nor does C{/v1/batches} take it as an input, while the batch runs on it and
    C{DELETE /v1/messages/batches/{id}} removes it; its output file is an OpenAI batch's, which OpenAI lets a
    client delete (the results stay). Before: listed with purpose C{batch} and deletable by the client, under
    the running batch."""
    gw, client, vllm, _ = setup
    auth = {"authorization": f"Bearer {KEY}"}
    made = await in_thread(client.messages.batches.create, requests=[request("held", fake_hold=True)])
    input_id = (await gw.service.store.batches.get(made.id))["input_file_id"]
    listed = await (await treq.get(f"{gw.url}/v1/files", headers=auth)).json()
    assert listed["data"] == []
    assert (await (await treq.get(f"{gw.url}/v1/files?purpose=message_batch", headers=auth)).json())["data"] == []
    for method, path in (("GET", ""), ("GET", "/content"), ("DELETE", "")):
        answer = await treq.request(method, f"{gw.url}/v1/files/{input_id}{path}", headers=auth)
        assert (answer.code, (await answer.json())["error"]["code"]) == (404, "file_not_found"), (method, path)
    reused = await treq.post(f"{gw.url}/v1/batches", headers=auth, json={
        "input_file_id": input_id, "endpoint": "/v1/messages", "completion_window": "24h"})
    assert (reused.code, (await reused.json())["error"]["code"]) == (404, "file_not_found")
    vllm.release_holds()
    batch = await ended(gw, client, made.id)
    assert batch.request_counts.succeeded == 1
    output_id = (await gw.service.store.batches.get(made.id))["output_file_id"]
    listed = await (await treq.get(f"{gw.url}/v1/files", headers=auth)).json()
    assert [(f["id"], f["purpose"]) for f in listed["data"]] == [(output_id, "batch_output")]
    deleted = await treq.delete(f"{gw.url}/v1/files/{output_id}", headers=auth)
    assert deleted.code == 200
    assert (await results(client, made.id))["held"].type == "succeeded"
    await in_thread(client.messages.batches.delete, made.id)
    assert (await gw.service.store.files.list(limit=100))[0] == []


async def test_the_list_pages_newest_first_and_shows_message_batches_only(setup):
    gw, client, _, _ = setup
    made = [(await in_thread(client.messages.batches.create, requests=[request(f"b{i}")])).id for i in range(5)]
    for batch_id in made:
        await ended(gw, client, batch_id)
    # an OpenAI batch of the same key is not a message batch
    upload = await treq.post(gw.url + "/v1/files", headers={"authorization": f"Bearer {KEY}"},
                             files={"file": ("in.jsonl", b'{"custom_id":"x","method":"POST","url":'
                                             b'"/v1/chat/completions","body":{"model":"' + NATIVE.encode()
                                             + b'","messages":[]}}\n')}, data={"purpose": "batch"})
    openai_batch = await treq.post(gw.url + "/v1/batches", headers={"authorization": f"Bearer {KEY}"}, json={
        "input_file_id": (await upload.json())["id"], "endpoint": "/v1/chat/completions",
        "completion_window": "24h"})
    openai_id = (await openai_batch.json())["id"]
    first = await in_thread(client.messages.batches.list, limit=2)
    assert [b.id for b in first.data] == made[::-1][:2] and first.has_more
    assert first.first_id == made[4] and first.last_id == made[3]
    after = await in_thread(lambda: client.messages.batches.list(limit=2, after_id=made[3]).data)
    assert [b.id for b in after] == [made[2], made[1]]
    before = await in_thread(lambda: client.messages.batches.list(limit=2, before_id=made[1]).data)
    assert [b.id for b in before] == [made[3], made[2]]
    everything = await in_thread(lambda: [b.id for b in client.messages.batches.list(limit=3)])  # (auto-paging)
    assert everything == made[::-1]
    with pytest.raises(anthropic.NotFoundError):
        await in_thread(client.messages.batches.retrieve, openai_id)
    with pytest.raises(anthropic.NotFoundError):
        await in_thread(lambda: client.messages.batches.list(after_id="batch_nobody"))
    with pytest.raises(anthropic.BadRequestError):
        await in_thread(lambda: client.messages.batches.list(after_id=made[3], before_id=made[1]))


async def test_another_tenants_key_sees_none_of_a_teams_message_batches(setup):
    gw, client, _, _ = setup
    keys = []
    for user_path in ("/team-a", "/team-b"):
        made = await treq.post(gw.url + "/admin/api/v1/auth-keys", headers={"authorization": f"Bearer {KEY}"},
                               json={"name": user_path[1:], "user_path": user_path})
        keys.append((await made.json())["value"])
    team_a, team_b = (anthropic.Anthropic(base_url=gw.url, api_key=k, max_retries=0, timeout=10) for k in keys)
    try:
        made = await in_thread(team_a.messages.batches.create, requests=[request("mine")])
        await ended(gw, team_a, made.id)
        assert [b.id for b in (await in_thread(team_a.messages.batches.list)).data] == [made.id]
        assert (await in_thread(team_b.messages.batches.list)).data == []
        for call in (team_b.messages.batches.retrieve, team_b.messages.batches.cancel, team_b.messages.batches.delete):
            with pytest.raises(anthropic.NotFoundError):
                await in_thread(call, made.id)
        raw = await treq.get(gw.url + f"/v1/messages/batches/{made.id}/results", headers={"x-api-key": keys[1]})
        assert raw.code == 404
        assert (await results(team_a, made.id))["mine"].type == "succeeded"
    finally:
        team_a.close()
        team_b.close()


async def test_a_message_batchs_requests_take_its_teams_cache_salt_wherever_its_key_moved_since(reactor, tmp_path):
    """A message batch's requests share vLLM's prefix cache with the team the batch is (the one its key was in when
    it made it), wherever the key moved while it ran; before, those read after the move took the new team's
    C{cache_salt}."""
    vllm = await start_fake(reactor)
    gw = await start_gateway(reactor, {"VLLM_BASE_URL": vllm.base_url, "GOMODEL_MASTER_KEY": KEY,
                                       "GOMODEL_DATA_DIR": str(tmp_path), "BATCH_CONCURRENCY_PER_PROVIDER": "1"})
    admin, keys, clients, salts = {"authorization": f"Bearer {KEY}"}, {}, [], {}
    try:
        for name, path in (("alice", "/team/a"), ("mover", "/team/b"), ("bob", "/team/b")):
            made = await treq.post(gw.url + "/admin/api/v1/auth-keys", headers=admin,
                                   json={"name": name, "user_path": path})
            keys[name] = await made.json()
            clients.append(anthropic.Anthropic(base_url=gw.url, api_key=keys[name]["value"], max_retries=0,
                                               timeout=10))
        alice, mover, bob = clients
        for team, client in (("a", alice), ("b", bob)):
            await in_thread(client.messages.create, model=NATIVE, max_tokens=16, messages=HELLO)
            salts[team] = vllm.last_request(b"/v1/messages").body["cache_salt"]
        assert salts["a"] != salts["b"]
        made = await in_thread(mover.messages.batches.create, requests=[
            request("first", fake_hold=True), request("waits"), request("next")])
        await vllm.when_held(1)  # (the last request is read once the first is answered)
        moved = await treq.patch(gw.url + f"/admin/api/v1/auth-keys/{keys['mover']['id']}", headers=admin,
                                 json={"user_path": "/team/a"})
        assert moved.code == 200
        vllm.release_holds()
        assert (await ended(gw, bob, made.id)).request_counts.succeeded == 3
        sent = {r.body["fake_marker"]: r.body["cache_salt"] for r in vllm.forwarded(b"/v1/messages")
                if "fake_marker" in r.body}
        assert sent == {"first": salts["b"], "waits": salts["b"], "next": salts["b"]}
    finally:
        await stop_all(gw, vllm, clients=clients)


@pytest_twisted.async_yield_fixture()
async def queued(reactor, tmp_path):
    """A gateway that runs one batch at a time, running one whose request the fake vLLM holds: the next waits,
    C{validating}."""
    vllm = await start_fake(reactor)
    gw = await start_gateway(reactor, {"VLLM_BASE_URL": vllm.base_url, "GOMODEL_MASTER_KEY": KEY,
                                       "GOMODEL_DATA_DIR": str(tmp_path), "BATCH_MAX_CLAIMED": "1"})
    client = anthropic.Anthropic(base_url=gw.url, api_key=KEY, max_retries=0, timeout=10)
    await in_thread(client.messages.batches.create, requests=[request("held", fake_hold=True)])
    await vllm.when_held(1)  # (the first batch's request)
    yield gw, client, vllm
    vllm.release_holds()
    await stop_all(gw, vllm, clients=(client,))


async def test_a_batch_waiting_for_its_turn_counts_its_requests_processing(queued):
    gw, client, _ = queued
    made = await in_thread(client.messages.batches.create, requests=[request(f"q{i}") for i in range(3)])
    assert (await gw.service.store.batches.get(made.id))["status"] == "validating"
    assert made.request_counts.processing == 3
    assert (await in_thread(client.messages.batches.retrieve, made.id)).request_counts.processing == 3
    [listed] = [b for b in (await in_thread(client.messages.batches.list)).data if b.id == made.id]
    assert listed.request_counts.processing == 3


async def test_a_batch_cancelled_before_it_started_ends_with_each_request_canceled(queued):
    gw, client, vllm = queued
    made = await in_thread(client.messages.batches.create, requests=[request(f"q{i}") for i in range(3)])
    cancelling = await in_thread(client.messages.batches.cancel, made.id)
    assert cancelling.processing_status == "canceling"
    batch = await ended(gw, client, made.id)
    assert batch.request_counts.model_dump() == {"processing": 0, "succeeded": 0, "errored": 0, "canceled": 3,
                                                 "expired": 0}
    got = await results(client, made.id)
    assert {custom_id: r.type for custom_id, r in got.items()} == {f"q{i}": "canceled" for i in range(3)}
    assert [r.body["fake_marker"] for r in vllm.requests if r.path == b"/v1/messages"] == ["held"]


async def test_a_model_the_key_may_no_longer_use_when_the_batch_starts_is_an_errored_result(queued):
    """As Anthropic's, a request that cannot run is an errored result: the batch runs the others."""
    gw, client, vllm = queued
    admin = {"authorization": f"Bearer {KEY}"}
    made = await treq.post(gw.url + "/admin/api/v1/auth-keys", headers=admin,
                           json={"name": "team", "models": [NATIVE]})
    key = await made.json()
    team = anthropic.Anthropic(base_url=gw.url, api_key=key["value"], max_retries=0, timeout=10)
    try:
        batch = await in_thread(team.messages.batches.create, requests=[request("q0"), request("q1"), request("q2")])
        changed = await treq.patch(gw.url + f"/admin/api/v1/auth-keys/{key['id']}", headers=admin,
                                   json={"models": ["vllm/another-model"]})
        assert changed.code == 200
        [first] = gw.service.batch_runner.held  # (the batch whose request the fake holds)
        vllm.release_holds()
        await gw.service.batch_runner.settled(first)  # (the look its end starts takes the batch left waiting)
        ended_batch = await ended(gw, team, batch.id)
        assert ended_batch.request_counts.model_dump() == {"processing": 0, "succeeded": 0, "errored": 3,
                                                           "canceled": 0, "expired": 0}
        got = await results(team, batch.id)
        assert {custom_id: (r.type, r.error.error.type) for custom_id, r in got.items()} == {
            f"q{i}": ("errored", "permission_error") for i in range(3)}
    finally:
        team.close()


async def test_a_vllm_without_the_messages_api_answers_the_lines_translated_as_online(reactor, tmp_path):
    """A vLLM that answers "no such route" for /v1/messages (no Messages API) gets the lines as chat completions,
    as an online request learns to; before, each line was an errored result (not_found_error)."""
    vllm = await start_fake(reactor, messages=False)
    gw = await start_gateway(reactor, {"VLLM_BASE_URL": vllm.base_url, "GOMODEL_MASTER_KEY": KEY,
                                       "GOMODEL_DATA_DIR": str(tmp_path), "BATCH_CONCURRENCY_PER_PROVIDER": "1"})
    client = anthropic.Anthropic(base_url=gw.url, api_key=KEY, max_retries=0, timeout=10)
    try:
        made = await in_thread(client.messages.batches.create, requests=[request("r0"), request("r1")])
        batch = await ended(gw, client, made.id)
        assert batch.request_counts.succeeded == 2
        got = await results(client, made.id)
        assert {custom_id: r.type for custom_id, r in got.items()} == {"r0": "succeeded", "r1": "succeeded"}
        assert got["r0"].message.type == "message" and got["r0"].message.content[0].type == "text"
        # each line asked natively at most once (one planned before the first learnt it), then translated
        native = [r.body["fake_marker"] for r in vllm.requests if r.path == b"/v1/messages"]
        assert native in (["r0"], ["r0", "r1"])
        assert len([r for r in vllm.requests if r.path == b"/v1/chat/completions"]) == 2
    finally:
        await stop_all(gw, vllm, clients=(client,))


@pytest.mark.utc_day
async def test_a_line_waiting_for_a_slot_is_refused_by_what_the_lines_before_it_spent(reactor, tmp_path):
    """A key's budget runs out midway: each line is checked once it may be sent (one slot: one at a time), so
    no line goes once the budget is spent; before, a line was checked before it waited for its slot, and went
    though the line before it had spent the budget meanwhile."""
    vllm = await start_fake(reactor)
    gw = await start_gateway(reactor, {"VLLM_BASE_URL": vllm.base_url, "GOMODEL_MASTER_KEY": KEY,
                                       "GOMODEL_DATA_DIR": str(tmp_path), "BATCH_CONCURRENCY_PER_PROVIDER": "1"})
    made = await treq.post(gw.url + "/admin/api/v1/auth-keys", headers={"authorization": f"Bearer {KEY}"}, json={
        "name": "team", "budgets": [{"period": "daily", "max_tokens": 30}]})  # (the fake's answer: 21 tokens)
    client = anthropic.Anthropic(base_url=gw.url, api_key=(await made.json())["value"], max_retries=0, timeout=10)
    try:
        batch = await in_thread(client.messages.batches.create, requests=[request(f"r{i}") for i in range(4)])
        await ended(gw, client, batch.id)
        got = await results(client, batch.id)
        assert [got[f"r{i}"].type for i in range(4)] == ["succeeded", "succeeded", "errored", "errored"]
        assert got["r2"].error.error.type == "rate_limit_error"
        assert "budget exceeded" in got["r2"].error.error.message
        assert [r.body["fake_marker"] for r in vllm.requests if r.path == b"/v1/messages"] == ["r0", "r1"]
    finally:
        await stop_all(gw, vllm, clients=(client,))


def test_each_way_a_request_ends_is_one_result_line():
    def line(data):
        return json.loads(result_line((1, "c", False, json.dumps(data).encode())))

    assert line({"custom_id": "c", "response": None, "error": {"code": "batch_expired", "message": "late"}}) == {
        "custom_id": "c", "result": {"type": "expired"}}
    assert line({"custom_id": "c", "response": None, "error": {"code": "batch_cancelled", "message": "x"}}) == {
        "custom_id": "c", "result": {"type": "canceled"}}
    assert line({"custom_id": "c", "response": None, "error": {"code": "budget_exceeded", "message": "spent"}}) == {
        "custom_id": "c", "result": {"type": "errored", "error": {"type": "error", "error": {
            "type": "rate_limit_error", "message": "spent"}}}}
    # a line of a key deactivated or expired since the batch began: as that key's online request, a 401's type
    revoked = line({"custom_id": "c", "response": None, "error": {"code": "invalid_api_key", "message": "gone"}})
    assert revoked["result"]["error"]["error"] == {"type": "authentication_error", "message": "gone"}
    timed_out = line({"custom_id": "c", "response": None, "error": {"code": "upstream_timeout", "message": "slow"}})
    assert timed_out["result"]["error"]["error"] == {"type": "timeout_error", "message": "slow"}
    # an OpenAI-compatible upstream's error envelope, in Anthropic's shape
    converted = line({"custom_id": "c", "response": {"status_code": 404, "request_id": "r", "body": {
        "error": {"message": "no such model", "type": "invalid_request_error", "param": None, "code": None}}}})
    assert converted["result"]["type"] == "errored"
    assert converted["result"]["error"]["type"] == "error"
    assert converted["result"]["error"]["error"] == {"type": "not_found_error", "message": "no such model"}
    # vLLM's own Messages error names its exception: Anthropic's type for the status
    vllm = line({"custom_id": "c", "response": {"status_code": 400, "request_id": "r", "body": {
        "type": "error", "error": {"type": "BadRequestError", "message": "too long"}}}})
    assert vllm["result"]["error"] == {"type": "error", "error": {"type": "invalid_request_error",
                                                                  "message": "too long"}}


async def test_openais_routes_and_anthropics_each_show_only_their_own_batches(setup):
    """A message batch is no OpenAI batch (its input file is the gateway's own, which C{/v1/files} 404s) and an
    OpenAI batch, even one of endpoint C{/v1/messages}, is no message batch: each API lists, pages (its
    cursors), shows, cancels and serves the results of its own only, for every tenant. Before, C{GET
    /v1/batches} listed message batches and C{/v1/messages/batches} an OpenAI batch of C{/v1/messages}."""
    import openai as openai_sdk

    gw, client, vllm, _ = setup
    made = await treq.post(gw.url + "/admin/api/v1/auth-keys", headers={"authorization": f"Bearer {KEY}"},
                           json={"name": "team", "user_path": "/team"})
    team_key = (await made.json())["value"]
    sdks = [openai_sdk.OpenAI(base_url=gw.url + "/v1", api_key=k, max_retries=0, timeout=10) for k in (KEY, team_key)]
    team_anthropic = anthropic.Anthropic(base_url=gw.url, api_key=team_key, max_retries=0, timeout=10)
    try:
        ids = {}
        for who, sdk, messages in (("", sdks[0], client), ("team-", sdks[1], team_anthropic)):
            line = {"custom_id": "o", "method": "POST", "url": "/v1/messages",
                    "body": {"model": NATIVE, "max_tokens": 16, "messages": HELLO}}
            ids[who + "m1"] = (await in_thread(messages.messages.batches.create, requests=[request("m1")])).id
            uploaded = await in_thread(sdk.files.create, file=("in.jsonl", json.dumps(line).encode() + b"\n"),
                                       purpose="batch")
            ids[who + "o1"] = (await in_thread(sdk.batches.create, input_file_id=uploaded.id,
                                               endpoint="/v1/messages", completion_window="24h")).id
            ids[who + "m2"] = (await in_thread(messages.messages.batches.create, requests=[request("m2")])).id
            for name in ("m1", "o1", "m2"):
                await gw.service.batch_runner.settled(ids[who + name])
        for who, sdk, messages in (("", sdks[0], client), ("team-", sdks[1], team_anthropic)):
            mine = [ids[who + "o1"]] + ([ids["team-o1"]] if not who else [])  # (the master key sees every tenant)
            listed = await in_thread(lambda: [b.id for b in sdk.batches.list(limit=1)])  # (auto-paging: after)
            assert sorted(listed) == sorted(mine), who
            page = await in_thread(sdk.batches.list, after=ids[who + "m2"])
            assert page.data == [] and not page.has_more
            for call in (sdk.batches.retrieve, sdk.batches.cancel):
                with pytest.raises(openai_sdk.NotFoundError):
                    await in_thread(call, ids[who + "m1"])
            raw = await treq.get(f"{gw.url}/v1/batches/{ids[who + 'm1']}/results",
                                 headers={"authorization": f"Bearer {sdk.api_key}"})
            assert (raw.code, (await raw.json())["error"]["code"]) == (404, "batch_not_found")
            assert (await in_thread(sdk.batches.retrieve, ids[who + "o1"])).endpoint == "/v1/messages"
            listed = await in_thread(lambda: [b.id for b in messages.messages.batches.list(limit=1)])
            assert set(listed) == {ids[who + "m1"], ids[who + "m2"]} | (
                {ids["team-m1"], ids["team-m2"]} if not who else set()), who
            for call in (messages.messages.batches.retrieve, messages.messages.batches.cancel,
                         messages.messages.batches.delete):
                with pytest.raises(anthropic.NotFoundError):
                    await in_thread(call, ids[who + "o1"])
            for cursor in ("after_id", "before_id"):
                with pytest.raises(anthropic.NotFoundError):
                    await in_thread(lambda: messages.messages.batches.list(**{cursor: ids[who + "o1"]}))
            raw = await treq.get(f"{gw.url}/v1/messages/batches/{ids[who + 'o1']}/results",
                                 headers={"x-api-key": sdk.api_key})
            assert raw.code == 404
        assert (await in_thread(sdks[0].batches.retrieve, ids["team-o1"])).status == "completed"
    finally:
        for sdk in sdks:
            sdk.close()
        team_anthropic.close()


async def test_a_line_the_upstream_refused_the_gateways_key_for_is_an_api_error_not_the_clients(setup):
    """An upstream's 401 (the gateway's provider key refused) is the gateway's 502 upstream_auth_failed, as online:
    the line's result is an api_error, never an authentication_error that blames the client's key."""
    gw, client, vllm, _ = setup
    refusal = json.dumps({"type": "error", "error": {"type": "authentication_error", "message": "bad key sk-x"}})
    made = await in_thread(client.messages.batches.create, requests=[
        request("refused", fake_status=401, fake_body=refusal)])
    await ended(gw, client, made.id)
    got = (await results(client, made.id))["refused"]
    assert got.type == "errored" and got.error.error.type == "api_error", got
    assert "refused the gateway's credentials" in got.error.error.message and "sk-x" not in got.error.error.message


async def test_results_and_counts_read_a_bounded_number_of_bytes_at_a_time(setup, monkeypatch):
    """C{/results} and the counts of an ended message batch read its results in slices of at most C{PAGE_BYTES}
    (and one more, whatever its size), as an OpenAI batch's do; before, 500 results of any size at a time (500
    long messages: hundreds of MiB held for one read)."""
    from gomodel.anthropic import batches as message_batches

    monkeypatch.setattr(message_batches, "PAGE_BYTES", 1500)
    gw, client, _, _ = setup
    made = await in_thread(client.messages.batches.create, requests=[
        request(f"r{i}", **({"fake_status": 400} if i % 3 == 0 else {})) for i in range(9)])
    await ended(gw, client, made.id)
    stored, sizes = gw.service.store.batches, []
    read_results = stored.read_results

    def reading(*args, **kwargs):
        assert kwargs.get("max_bytes") == 1500, (args, kwargs)
        return read_results(*args, **kwargs).addCallback(lambda got: sizes.append([len(r[3]) for r in got]) or got)

    monkeypatch.setattr(stored, "read_results", reading)
    batch = await in_thread(client.messages.batches.retrieve, made.id)  # (its counts: its error lines read)
    assert (batch.request_counts.succeeded, batch.request_counts.errored) == (6, 3)
    assert sorted((await results(client, made.id))) == [f"r{i}" for i in range(9)]
    assert sizes and all(len(page) <= 1 or sum(page) <= 1500 for page in sizes), sizes
    assert max(len(page) for page in sizes) > 1


async def test_results_are_archived_and_swept_after_message_batch_results_expire_after(reactor, setup, tmp_path):
    """Anthropic keeps a batch's results 29 days, then archives it (C{archived_at}): the batch is still shown,
    its counts as they were, but its results are gone. Here they expire C{MESSAGE_BATCH_RESULTS_EXPIRE_AFTER}
    (29 days) after the batch ended: its output and error files with them, the results route a 404
    C{not_found_error}, and the files sweep removes its answers and its requests from the store. Before, they
    were kept for good."""
    gw, client, vllm, _ = setup
    made = await in_thread(client.messages.batches.create, requests=[
        request("ok"), request("refused", fake_status=400, fake_body="{}"), request("held", fake_hold=True)])
    await vllm.when_held(1)  # (the third request sent)
    await in_thread(client.messages.batches.cancel, made.id)
    batch = await ended(gw, client, made.id)
    counts = {"processing": 0, "succeeded": 1, "errored": 1, "canceled": 1, "expired": 0}
    assert batch.request_counts.model_dump() == counts and batch.archived_at is None
    store = gw.service.store
    record = await store.batches.get(made.id)
    assert record["output_expires_after"] == 29 * 86400
    files = [await store.files.get(record[k]) for k in ("input_file_id", "output_file_id", "error_file_id")]
    assert [f["expires_at"] - f["created_at"] for f in files] == [30 * 86400, 29 * 86400, 29 * 86400]
    assert set(await results(client, made.id)) == {"ok", "refused", "held"}

    ended_at = record["cancelled_at"] - 29 * 86400 - 1  # as if it ended 29 days ago and a second
    with sqlite3.connect(tmp_path / "gomodel.db") as conn:
        conn.execute("UPDATE batches SET cancelled_at = ? WHERE id = ?", (ended_at, made.id))
        conn.execute("UPDATE files SET expires_at = 1 WHERE id IN (?, ?, ?)",
                     tuple(record[k] for k in ("input_file_id", "output_file_id", "error_file_id")))
    archived = await in_thread(client.messages.batches.retrieve, made.id)
    assert archived.archived_at is not None
    assert archived.archived_at.timestamp() == ended_at + 29 * 86400
    assert archived.processing_status == "ended" and archived.request_counts.model_dump() == counts
    raw = await treq.get(gw.url + f"/v1/messages/batches/{made.id}/results", headers={"x-api-key": KEY})
    answer = await raw.json()
    assert (raw.code, answer["type"], answer["error"]["type"]) == (404, "error", "not_found_error")
    with pytest.raises(anthropic.NotFoundError):
        await results(client, made.id)

    await StoreSweeper(store.files, store.blobs, store.claims, reactor, process_owner(),
                       batches=store.batches).sweep()
    kept = await store.batches.read_results(made.id, -1, 100)
    assert [(row[1], row[2]) for row in kept] == [("held", False)]  # (what counts it as canceled: no answer)
    assert (await store.files.list(limit=100))[0] == [] and await store.files.known(
        [record[k] for k in ("input_file_id", "output_file_id", "error_file_id")]) == set()
    again = await in_thread(client.messages.batches.retrieve, made.id)
    assert again.request_counts.model_dump() == counts


async def test_a_translated_lines_tool_name_past_64_characters_goes_short_and_comes_back_as_declared(setup):
    """A line translated to an OpenAI provider whose tool's name is longer than OpenAI takes (64 characters; Claude
    Code's MCP tools) is sent it short, and its result's call names it as the line declared it, as online."""
    gw, client, vllm, openai = setup
    tool = {"name": "mcp__" + "weather_service_" * 5 + "get_weather", "input_schema": {"type": "object"}}
    made = await in_thread(client.messages.batches.create, requests=[
        request("probe", model=TRANSLATED, tools=[tool], max_tokens=16)])
    await ended(gw, client, made.id)
    short = openai.last_request().body["tools"][0]["function"]["name"]
    assert len(short) <= 64 < len(tool["name"])
    openai.steer = {"fake_tool": {"name": short, "arguments": "{}"}}
    made = await in_thread(client.messages.batches.create, requests=[request("called", model=TRANSLATED, tools=[tool])])
    await ended(gw, client, made.id)
    got = await results(client, made.id)
    assert got["called"].type == "succeeded", got["called"]
    assert [(block.type, block.name) for block in got["called"].message.content] == [("tool_use", tool["name"])]


async def test_a_lines_older_output_format_reaches_a_native_vllm_as_its_output_config(setup):
    """vLLM 0.32's Messages API reads C{output_config.format} and drops the older top-level C{output_format}: a
    native line sends it as the former, as online (L{tests.test_messages})."""
    gw, client, vllm, _ = setup
    wanted = {"type": "json_schema", "schema": {"type": "object", "properties": {"a": {"type": "string"}}}}
    made = await in_thread(client.messages.batches.create, requests=[request("shaped", output_format=wanted)])
    await ended(gw, client, made.id)
    assert (await results(client, made.id))["shaped"].type == "succeeded"
    [sent] = [r for r in vllm.requests if r.method == b"POST"]
    assert sent.path == b"/v1/messages"
    assert sent.body["output_config"] == {"format": wanted} and "output_format" not in sent.body
