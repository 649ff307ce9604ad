"""The rest of the vLLM surface: embeddings, completions, rerank/score/classify, Responses."""

import base64
import json
import struct

import pytest
import pytest_twisted
import treq

from gomodel import jsonutil
from gomodel.proxy import exchange
from tests.rawclient import connect
from tests.support import in_thread, openai_client, start_fake, start_gateway, with_timeout

MODEL = "vllm/meta-llama/Llama-3.1-8B-Instruct"
UPSTREAM = "meta-llama/Llama-3.1-8B-Instruct"


async def post_json(http, url, body):
    response = await http.post(url, data=json.dumps(body).encode(), headers={"content-type": "application/json"})
    return response, await treq.content(response)


@pytest_twisted.ensureDeferred
async def test_embeddings_float_and_base64_kept_as_sent(http, gateway, fake):
    client = openai_client(gateway)
    try:
        floats = await in_thread(client.embeddings.create, model=MODEL, input=["a", "b"], encoding_format="float")
        assert [d.embedding for d in floats.data] == [[0.1, -0.25, 0.5]] * 2
        assert fake.last_request().body == {"model": UPSTREAM, "input": ["a", "b"], "encoding_format": "float"}
        decoded = await in_thread(client.embeddings.create, model=MODEL, input="a")  # the SDK asks for base64
        assert decoded.data[0].embedding == [1.0, 2.0, 3.0]
    finally:
        client.close()
    response, content = await post_json(http, gateway.url + "/v1/embeddings",
                                        {"model": MODEL, "input": "a", "encoding_format": "base64"})
    raw = jsonutil.loads(content)["data"][0]["embedding"]
    assert raw == "AACAPwAAAEAAAEBA"
    assert struct.unpack("<3f", base64.b64decode(raw)) == (1.0, 2.0, 3.0)


@pytest_twisted.ensureDeferred
async def test_binary_embeddings_are_relayed_with_their_metadata_and_their_usage_recorded(reactor, http, fake,
                                                                                        tmp_path):
    # vLLM's encoding_format "bytes": the body is the vectors, their places and the usage are in its
    # "metadata" header.
    gw = await start_gateway(reactor, {"VLLM_BASE_URL": fake.base_url, "GOMODEL_DATA_DIR": str(tmp_path)})
    try:
        response, content = await post_json(http, gw.url + "/v1/embeddings",
                                            {"model": MODEL, "input": ["a", "b"], "encoding_format": "bytes"})
        assert response.code == 200
        assert response.headers.getRawHeaders("content-type") == ["application/octet-stream"]
        assert struct.unpack("<6f", content) == (1.0, 2.0, 3.0) * 2
        metadata = jsonutil.loads(response.headers.getRawHeaders("metadata")[0].encode())
        assert [item["start"] for item in metadata["data"]] == [0, 12]
        response, content = await post_json(http, gw.url + "/p/vllm/v1/embeddings",  # the passthrough too
                                            {"model": UPSTREAM, "input": "a", "encoding_format": "bytes"})
        assert response.code == 200 and len(content) == 12
        await gw.service.usage.flush()
        records, _ = await gw.service.store.usage.log(0, 2e9, 10)
        assert [(r["endpoint"], r["input_tokens"], r["total_tokens"]) for r in records] == [
            ("/p/{provider}/{endpoint}", 4, 4), ("/v1/embeddings", 4, 4)]
    finally:
        await gw.service.stopService()


@pytest_twisted.ensureDeferred
async def test_binary_embeddings_without_metadata_have_their_prompt_estimated(reactor, http, fake, tmp_path):
    # vLLM's encoding_format "bytes_only": the vectors alone, no metadata header, so no usage at all. Before, such a
    # request was recorded without tokens: a key's token budgets and tpm never counted it. Now its prompt (what the
    # upstream read) is estimated from the request, as for a request whose usage never came.
    gw = await start_gateway(reactor, {"VLLM_BASE_URL": fake.base_url, "GOMODEL_DATA_DIR": str(tmp_path)})
    try:
        response, content = await post_json(http, gw.url + "/v1/embeddings",
                                            {"model": MODEL, "input": ["a" * 40, "b" * 40], "encoding_format": "bytes_only"})
        assert response.code == 200 and struct.unpack("<6f", content) == (1.0, 2.0, 3.0) * 2
        assert response.headers.getRawHeaders("metadata") is None
        response, content = await post_json(http, gw.url + "/p/vllm/v1/embeddings",  # the passthrough too
                                            {"model": UPSTREAM, "input": [[1, 2, 3], [4, 5]],
                                             "encoding_format": "bytes_only"})
        assert response.code == 200 and len(content) == 24
        response, content = await post_json(http, gw.url + "/p/vllm/v1/embeddings",  # refused: nothing was read
                                            {"model": UPSTREAM, "input": "a" * 40, "encoding_format": "bytes_only",
                                             "fake_status": 400, "fake_body": '{"error": {"message": "no"}}'})
        assert response.code == 400
        await gw.service.usage.flush()
        records, _ = await gw.service.store.usage.log(0, 2e9, 10)
        assert [(r["endpoint"], r["input_tokens"], r["total_tokens"], r["estimated"]) for r in records] == [
            ("/p/{provider}/{endpoint}", None, None, False), ("/p/{provider}/{endpoint}", 5, 5, True),
            ("/v1/embeddings", 20, 20, True)]
    finally:
        await gw.service.stopService()


@pytest_twisted.ensureDeferred
async def test_an_embeddings_answer_too_large_to_hold_is_relayed_as_it_comes(reactor, http, fake, tmp_path,
                                                                           monkeypatch):
    # A big batch of inputs (a 4096-dimension model's floats for a few thousand texts pass 256 MiB) is vLLM's
    # to answer: the gateway relays what it cannot hold, byte for byte, and still records its usage.
    monkeypatch.setattr(exchange, "RESPONSE_BODY_LIMIT", 64 * 1024)
    gw = await start_gateway(reactor, {"VLLM_BASE_URL": fake.base_url, "GOMODEL_DATA_DIR": str(tmp_path)})
    client = openai_client(gw)
    try:
        texts = [f"text {i}" for i in range(3000)]  # about 170 kB of answer
        answer = await in_thread(client.embeddings.create, model=MODEL, input=texts, encoding_format="float")
        assert len(answer.data) == 3000 and answer.data[-1].embedding == [0.1, -0.25, 0.5]
        response, content = await post_json(http, gw.url + "/v1/embeddings", {"model": MODEL, "input": texts})
        assert response.code == 200 and len(content) > 64 * 1024
        assert jsonutil.loads(content)["usage"]["prompt_tokens"] == 4
        await gw.service.usage.flush()
        records, _ = await gw.service.store.usage.log(0, 2e9, 10)
        assert [(r["endpoint"], r["status_code"], r["input_tokens"]) for r in records] == [
            ("/v1/embeddings", 200, 4)] * 2
    finally:
        client.close()
        await gw.service.stopService()


@pytest_twisted.ensureDeferred
async def test_legacy_completions_plain_and_streamed(gateway, fake):
    client = openai_client(gateway)
    try:
        plain = await in_thread(client.completions.create, model=MODEL, prompt="Hello", max_tokens=3,
                                extra_body={"top_k": 3})
        assert plain.choices[0].text == "héhéhé"
        assert fake.last_request().path == b"/v1/completions"
        assert fake.last_request().body["top_k"] == 3

        def collect():
            return list(client.completions.create(model=MODEL, prompt="Hello", stream=True))

        chunks = await in_thread(collect)
        assert "".join(c.choices[0].text for c in chunks) == "héhéhé"
        assert all(c.usage is None for c in chunks)
        assert fake.last_request().body["stream_options"] == {"include_usage": True}
    finally:
        client.close()


@pytest_twisted.ensureDeferred
async def test_a_stream_the_upstream_sent_unasked_is_one_json_answer(http, gateway, fake):
    """Not asked to stream, an upstream that streams anyway: the client gets the one chat.completion or
    text_completion the events make, as JSON (before: the stream's events went as they came)."""
    client = openai_client(gateway)
    anyway = {"fake_stream_anyway": True}
    try:
        chat = await in_thread(client.chat.completions.create, model=MODEL, max_tokens=3,
                               messages=[{"role": "user", "content": "hi"}], extra_body=anyway)
        assert chat.object == "chat.completion" and chat.choices[0].message.content == "héhéhé"
        assert chat.choices[0].finish_reason == "length" and chat.choices[0].message.role == "assistant"
        tool = {"name": "get_weather", "arguments": '{"city": "Paris"}'}
        called = await in_thread(client.chat.completions.create, model=MODEL,
                                 messages=[{"role": "user", "content": "hi"}],
                                 extra_body=dict(anyway, fake_tool=tool, fake_reasoning="Weather."))
        [call] = called.choices[0].message.tool_calls
        assert (call.id, call.type, call.function.name, call.function.arguments) == (
            "chatcmpl-tool-fake1", "function", "get_weather", '{"city": "Paris"}')
        assert called.choices[0].message.reasoning == "Weather." and called.choices[0].finish_reason == "tool_calls"
        text = await in_thread(client.completions.create, model=MODEL, prompt="Hello", extra_body=anyway)
        assert text.object == "text_completion" and text.choices[0].text == "héhéhé"
        assert text.choices[0].finish_reason == "length"
    finally:
        client.close()
    response, content = await post_json(http, gateway.url + "/v1/chat/completions", {
        "model": MODEL, "messages": [{"role": "user", "content": "hi"}], "stream": False,
        "stream_options": {"include_usage": True}, **anyway})  # (the fake then ends with a usage chunk)
    assert response.code == 200 and response.headers.getRawHeaders("content-type") == ["application/json"]
    answer = jsonutil.loads(content)
    assert answer["usage"] == {"prompt_tokens": 18, "total_tokens": 21, "completion_tokens": 3}
    assert response.length == len(content)
    # An in-band error is the error it says; a stream that is not whole is a 502, never a partial answer.
    error = {"error": {"message": "The engine died.", "type": "InternalServerError", "param": None, "code": 500}}
    cases = [([chat_chunk({"content": "A"}), json.dumps(error)], 500, "The engine died."),
             ([chat_chunk({"content": "A"}, "stop")], 502, "without [DONE]"),
             ([chat_chunk({"content": "A"}), "not json", "[DONE]"], 502, "no JSON object")]
    for sse, status, said in cases:
        response, content = await post_json(http, gateway.url + "/v1/chat/completions", {
            "model": MODEL, "messages": [{"role": "user", "content": "hi"}], "fake_sse": sse, **anyway})
        assert response.code == status and said in jsonutil.loads(content)["error"]["message"], content
        assert response.headers.getRawHeaders("content-type") == ["application/json"]
    # A native Responses request: the response object of its last event, kept as the gateway keeps one.
    response, content = await post_json(http, gateway.url + "/v1/responses",
                                        {"model": MODEL, "input": "hi", **anyway})
    assert response.code == 200 and response.headers.getRawHeaders("content-type") == ["application/json"]
    made = jsonutil.loads(content)
    assert made["object"] == "response" and made["status"] == "completed"
    kept = await http.get(gateway.url + f"/v1/responses/{made['id']}")
    assert (await kept.json())["output"] == made["output"]


@pytest_twisted.ensureDeferred
async def test_rerank_score_and_classify_by_qualified_model(reactor, http):
    rerank = await start_fake(reactor, models=("BAAI/bge-reranker-base",))
    gw = await start_gateway(reactor, {"VLLM_RERANK_BASE_URL": rerank.base_url})
    try:
        body = {"model": "vllm-rerank/BAAI/bge-reranker-base", "query": "q", "documents": ["a", "b", "c"],
                "top_n": 2}
        response, content = await post_json(http, gw.url + "/v1/rerank", body)
        assert response.code == 200
        assert [r["index"] for r in jsonutil.loads(content)["results"]] == [0, 1]
        assert rerank.last_request().path == b"/v1/rerank"
        assert rerank.last_request().body == dict(body, model="BAAI/bge-reranker-base")

        response, content = await post_json(http, gw.url + "/v1/score", {
            "model": "vllm-rerank/BAAI/bge-reranker-base", "text_1": "a", "text_2": "b"})
        assert jsonutil.loads(content)["data"][0]["score"] == 0.75
        assert rerank.last_request().path == b"/v1/score"

        response, content = await post_json(http, gw.url + "/v1/classify", {
            "model": "vllm-rerank/BAAI/bge-reranker-base", "input": ["x"]})
        assert jsonutil.loads(content)["data"][0]["label"] == "LABEL_0"
        assert rerank.last_request().path == b"/classify"  # vLLM serves it at the root

        response, content = await post_json(http, gw.url + "/v1/rerank", {"model": "vllm-rerank/nope", "query": "q"})
        assert response.code == 404

        # vLLM's own paths at its root (the Cohere SDK's /v2/rerank and /v2/embed): routed by model as the /v1
        # forms are (before: 404 Unknown route, the passthrough the only way, with no model routing)
        for path in ("/rerank", "/v2/rerank", "/score", "/classify", "/pooling", "/v2/embed"):
            response, content = await post_json(http, gw.url + path, dict(body, input="x"))
            assert response.code == 200, (path, content)
            assert rerank.last_request().path == path.encode()
            assert rerank.last_request().body["model"] == "BAAI/bge-reranker-base"
        response, content = await post_json(http, gw.url + "/v2/rerank", dict(body, model="vllm-rerank/nope"))
        assert response.code == 404 and jsonutil.loads(content)["error"]["code"] == "model_not_found"
    finally:
        await gw.service.stopService()
        await rerank.stop()


@pytest_twisted.ensureDeferred
async def test_cohere_embed_usage_is_read_from_its_meta_tokens_or_billed_units(reactor, http, fake, tmp_path):
    # vLLM's /v2/embed (the Cohere SDK's) answers with no "usage": its tokens are in meta.tokens (Cohere's own API
    # has meta.billed_units). Before, its requests were recorded with no tokens: free of token budgets and rate
    # limits, uncounted in the ledger; then only billed_units was read, which vLLM never sends.
    fake.models.append("BAAI/bge")
    gw = await start_gateway(reactor, {"VLLM_BASE_URL": fake.base_url, "GOMODEL_DATA_DIR": str(tmp_path)})
    cohere = {"id": "e", "embeddings": {"float": [[0.5]]}, "texts": ["a"],
              "meta": {"api_version": {"version": "2"}, "billed_units": {"input_tokens": 5}}}
    try:
        response, content = await post_json(http, gw.url + "/v2/embed", {"model": "vllm/BAAI/bge", "texts": ["a"],
                                                                         "embedding_types": ["float"]})
        assert response.code == 200, content
        assert jsonutil.loads(content)["meta"] == {"api_version": {"version": "2"}, "tokens": {"input_tokens": 7}}
        response, content = await post_json(http, gw.url + "/p/vllm/v2/embed", {"model": "BAAI/bge", "texts": ["a"]})
        assert response.code == 200, content
        response, content = await post_json(http, gw.url + "/v2/embed", {
            "model": "vllm/BAAI/bge", "texts": ["a"], "fake_status": 200, "fake_body": json.dumps(cohere)})
        assert response.code == 200 and jsonutil.loads(content) == cohere
        await gw.service.usage.flush()
        records, _ = await gw.service.store.usage.log(0, 2e9, 10)
        assert [(r["endpoint"], r["model"], r["input_tokens"], r["output_tokens"], r["total_tokens"])
                for r in records] == [("/v2/embed", "vllm/BAAI/bge", 5, 0, 5),
                                      ("/p/{provider}/{endpoint}", "vllm/BAAI/bge", 7, 0, 7),
                                      ("/v2/embed", "vllm/BAAI/bge", 7, 0, 7)]
    finally:
        await gw.service.stopService()


@pytest_twisted.ensureDeferred
async def test_rerank_usage_of_total_tokens_alone_is_its_input_and_priced(reactor, http, tmp_path):
    # An older vLLM's rerank (/v1/rerank, /rerank, the Cohere SDK's /v2/rerank) says its usage as
    # {"total_tokens": N} alone, as Jina's and Voyage's APIs do: every one of them is a prompt token. Before, such
    # a request was recorded with no input tokens and so no cost: a priced reranker was free.
    rerank = await start_fake(reactor, models=("BAAI/bge-reranker-base",))
    config = tmp_path / "gomodel.yaml"
    config.write_text("pricing:\n  vllm-rerank/BAAI/bge-reranker-base: {input_per_mtok: 1000000}\n")
    gw = await start_gateway(reactor, {"VLLM_RERANK_BASE_URL": rerank.base_url, "GOMODEL_DATA_DIR": str(tmp_path)},
                             yaml_path=str(config))
    answer = {"id": "score-fake", "model": "BAAI/bge-reranker-base", "usage": {"total_tokens": 10},
              "results": [{"index": 0, "document": {"text": "a", "multi_modal": None}, "relevance_score": 0.5}]}
    try:
        for path in ("/v1/rerank", "/v2/rerank"):
            response, content = await post_json(http, gw.url + path, {
                "model": "vllm-rerank/BAAI/bge-reranker-base", "query": "q", "documents": ["a"],
                "fake_status": 200, "fake_body": json.dumps(answer)})
            assert response.code == 200 and jsonutil.loads(content) == answer  # (relayed as it came)
        await gw.service.usage.flush()
        records, _ = await gw.service.store.usage.log(0, 2e9, 10)
        assert sorted((r["endpoint"], r["input_tokens"], r["output_tokens"], r["total_tokens"], r["total_cost"])
                      for r in records) == [("/v1/rerank", 10, 0, 10, 10.0), ("/v2/rerank", 10, 0, 10, 10.0)]
    finally:
        await gw.service.stopService()
        await rerank.stop()


@pytest_twisted.ensureDeferred
async def test_native_responses_plain_and_streamed(gateway, fake):
    client = openai_client(gateway)
    fake.stored_responses["resp_prev"] = {"id": "resp_prev"}  # vLLM knows it; the gateway does not
    try:
        response = await in_thread(client.responses.create, model=MODEL, input="hi", max_output_tokens=3,
                                   previous_response_id="resp_prev", store=True, background=False,
                                   reasoning={"effort": "low"}, extra_body={"top_k": 2})
        assert response.output_text == "héhéhé"
        seen = fake.last_request()
        assert seen.path == b"/v1/responses"
        assert seen.body == {"model": UPSTREAM, "input": "hi", "max_output_tokens": 3,
                             "previous_response_id": "resp_prev", "store": True, "background": False,
                             "reasoning": {"effort": "low"}, "top_k": 2}

        def stream():
            with client.responses.stream(model=MODEL, input="hi") as events:
                kinds = [e.type for e in events]
                return kinds, events.get_final_response()

        kinds, final = await in_thread(stream)
        assert kinds[0] == "response.created" and kinds[-1] == "response.completed"
        assert final.output_text == "héhéhé"
        assert final.usage.input_tokens == 19
    finally:
        client.close()


@pytest_twisted.ensureDeferred
async def test_broken_native_responses_stream_is_reported(http, gateway):
    from tests.rawclient import chat_request

    request = chat_request({"model": MODEL, "input": "hi", "stream": True, "fake_die_after": 3})
    request = request.replace(b"/v1/chat/completions", b"/v1/responses")
    from twisted.internet import reactor

    client = await connect(reactor, gateway.port, request)
    await with_timeout(reactor, client.lost, 5)
    assert b"response.content_part.added" in client.received
    assert b"stream_incomplete" in client.received
    assert not bytes(client.received).endswith(b"0\r\n\r\n")


def created_events(client, **kwargs):
    """The events of C{responses.create(stream=True)} through the SDK, and what it raised (None if nothing)."""
    seen = []
    try:
        for event in client.responses.create(model=MODEL, input="hi", stream=True, **kwargs):
            seen.append(event)
    except Exception as e:  # noqa: BLE001 - what the client saw is the point
        return seen, e
    return seen, None


def assert_error_event(seen, code, said=""):
    """C{seen} (SDK events) ends with OpenAI's typed error event, numbered after the event before it."""
    from openai.types.responses import ResponseErrorEvent

    error = seen[-1]
    assert isinstance(error, ResponseErrorEvent), seen
    assert error.type == "error" and error.code == code and said in error.message and error.param is None
    assert [event.sequence_number for event in seen] == list(range(len(seen)))


@pytest_twisted.ensureDeferred
async def test_a_broken_responses_stream_ends_with_openais_error_event(gateway, fake, reactor):
    """A Responses stream that breaks ends with OpenAI's C{error} event (C{event: error}, its C{type},
    C{code}, C{message}, C{param} and the C{sequence_number} after the last one sent); a chat stream keeps
    its C{data: {"error": ...}}. Before: C{data: {"error": ...}} on every stream, which is no Responses
    stream event."""
    import openai
    from tests.rawclient import chat_request

    client = openai_client(gateway)
    try:
        seen, raised = await in_thread(created_events, client, extra_body={"fake_die_after": 3})
        assert isinstance(raised, openai.APIError) and len(seen) == 4
        assert_error_event(seen, "stream_incomplete", "the upstream connection broke off")
    finally:
        client.close()
    request = chat_request({"model": MODEL, "input": "hi", "stream": True, "fake_die_after": 2})
    raw = await connect(reactor, gateway.port, request.replace(b"/v1/chat/completions", b"/v1/responses"))
    await with_timeout(reactor, raw.lost, 5)
    last = bytes(raw.received).rpartition(b"\nevent: ")[2]
    assert last.startswith(b"error\ndata: {"), last
    assert set(jsonutil.loads(last[12:].split(b"\n")[0])) == {"type", "code", "message", "param", "sequence_number"}
    # the same through the passthrough, numbered after the last event relayed (before: no sequence_number)
    passed = chat_request({"model": MODEL.partition("/")[2], "input": "hi", "stream": True, "fake_die_after": 2})
    raw = await connect(reactor, gateway.port, passed.replace(b"/v1/chat/completions", b"/p/vllm/v1/responses"))
    await with_timeout(reactor, raw.lost, 5)
    last = bytes(raw.received).rpartition(b"\nevent: ")[2]
    assert last.startswith(b"error\ndata: {"), bytes(raw.received)[-300:]
    event = jsonutil.loads(last[12:].split(b"\n")[0])
    assert set(event) == {"type", "code", "message", "param", "sequence_number"} and event["sequence_number"] == 2
    chat = await connect(reactor, gateway.port, chat_request(
        {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "stream": True, "fake_die_after": 2}))
    await with_timeout(reactor, chat.lost, 5)
    assert b'data: {"error":{' in bytes(chat.received) and b"event: error" not in bytes(chat.received)


@pytest_twisted.async_yield_fixture()
async def translating(reactor):
    fake = await start_fake(reactor, responses=False)
    gw = await start_gateway(reactor, {"VLLM_BASE_URL": fake.base_url})
    yield gw, fake
    await gw.service.stopService()
    await fake.stop()


@pytest_twisted.ensureDeferred
async def test_responses_translated_to_chat_when_the_provider_has_none(translating):
    gw, fake = translating
    client = openai_client(gw)
    try:
        response = await in_thread(
            client.responses.create, model=MODEL, instructions="Be brief.",
            input=[{"role": "user", "content": [{"type": "input_text", "text": "hi"}]},
                   {"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{}"},
                   {"type": "function_call_output", "call_id": "c1", "output": "42"}],
            max_output_tokens=3, tools=[{"type": "function", "name": "f", "parameters": {"type": "object"}}],
            tool_choice={"type": "function", "name": "f"}, extra_body={"top_k": 4})
        assert response.output_text == "héhéhé"
        assert response.status == "incomplete"  # the chat answer stopped at max tokens
        assert response.usage.input_tokens == 18 and response.usage.output_tokens == 3
        chat = fake.last_request()
        assert chat.path == b"/v1/chat/completions"
        assert chat.body["messages"] == [
            {"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"},
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
            {"role": "tool", "tool_call_id": "c1", "content": "42"}]
        assert chat.body["max_tokens"] == 3 and chat.body["top_k"] == 4
        assert chat.body["tools"] == [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
        assert chat.body["tool_choice"] == {"type": "function", "function": {"name": "f"}}
        probes = [r for r in fake.requests if r.path == b"/v1/responses"]
        assert len(probes) == 1

        def stream():
            with client.responses.stream(model=MODEL, input="hi") as events:
                return [e.type for e in events], events.get_final_response()

        kinds, final = await in_thread(stream)
        assert kinds == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added", "response.output_text.delta",
                         "response.output_text.delta", "response.output_text.delta", "response.output_text.done",
                         "response.content_part.done", "response.output_item.done", "response.completed"]
        assert final.status == "incomplete" and final.output_text == "héhéhé"
        assert len([r for r in fake.requests if r.path == b"/v1/responses"]) == 1  # remembered
    finally:
        client.close()


@pytest_twisted.ensureDeferred
async def test_translated_instructions_given_as_input_items_and_a_chat_refusal(translating, http):
    """Instructions given as input items reach the chat upstream as its first messages; a chat answer's
    C{refusal} is the output message's C{refusal} part, plain and streamed (with OpenAI's refusal events).
    Before, both were dropped: the model never saw the instructions, the client got an empty output."""
    gw, fake = translating
    client = openai_client(gw)
    refusal = "I can't help with that."
    try:
        await in_thread(client.responses.create, model=MODEL, input="hi", instructions=[
            {"role": "developer", "content": "Be brief."},
            {"type": "message", "role": "system", "content": [{"type": "input_text", "text": "Speak French."}]}])
        assert fake.last_request().path == b"/v1/chat/completions"
        assert fake.last_request().body["messages"] == [{"role": "system", "content": "Be brief."},
                                                      {"role": "system", "content": "Speak French."},
                                                      {"role": "user", "content": "hi"}]
        refused = {"fake_status": 200, "fake_body": json.dumps({
            "id": "c", "object": "chat.completion", "model": UPSTREAM, "choices": [{
                "index": 0, "finish_reason": "stop",
                "message": {"role": "assistant", "content": None, "refusal": refusal}}]})}
        response = await in_thread(client.responses.create, model=MODEL, input="hi", extra_body=refused)
        [message] = response.output
        assert [(p.type, p.refusal) for p in message.content] == [("refusal", refusal)]

        def stream(extra):
            with client.responses.stream(model=MODEL, input="hi", extra_body=extra) as events:
                return [e.type for e in events], events.get_final_response()

        for extra in ({"fake_deltas": [{"content": "Non. "}, {"refusal": "I can't "}, {"refusal": "help with that."}]},
                      refused):  # (a stream, and a whole answer made a stream)
            kinds, final = await in_thread(stream, extra)
            assert kinds.count("response.refusal.delta") >= 1 and kinds.count("response.refusal.done") == 1
            parts = final.output[0].content
            assert (parts[-1].type, parts[-1].refusal) == ("refusal", refusal)
        assert [p.type for p in parts] == ["refusal"] and final.output_text == ""
        kinds, final = await in_thread(stream, {"fake_deltas": [{"content": "Non. "}, {"refusal": refusal}]})
        assert [p.type for p in final.output[0].content] == ["output_text", "refusal"]
        assert final.output_text == "Non. " and kinds.count("response.content_part.done") == 2
    finally:
        client.close()
    response, content = await post_json(http, gw.url + "/v1/responses",
                                        {"model": MODEL, "input": "hi", "instructions": [{"type": "web_search"}]})
    assert response.code == 400 and jsonutil.loads(content)["error"]["param"] == "instructions"


@pytest_twisted.ensureDeferred
async def test_a_translated_responses_request_an_upstream_streamed_anyway_gets_one_response(translating, http):
    """Not asked to stream, the upstream streams: the client gets the one response object the chat chunks
    make, as JSON (as Messages' clients get one message), and it is kept (before: the Responses API's
    events, which the client had not asked for)."""
    gw, fake = translating
    await post_json(http, gw.url + "/v1/responses", {"model": MODEL, "input": "hi"})  # (no /responses: learnt)
    response, content = await post_json(http, gw.url + "/v1/responses",
                                        {"model": MODEL, "input": "hi", "fake_stream_anyway": True})
    assert response.code == 200 and response.headers.getRawHeaders("content-type") == ["application/json"]
    final = jsonutil.loads(content)
    assert final["object"] == "response" and final["output"][0]["content"][0]["text"] == "héhéhé"
    kept = await http.get(gw.url + f"/v1/responses/{final['id']}")
    assert kept.code == 200 and (await kept.json())["output"] == final["output"]


@pytest_twisted.ensureDeferred
async def test_translated_stream_completes_with_usage(translating, http):
    gw, fake = translating
    response, content = await post_json(http, gw.url + "/v1/responses",
                                        {"model": MODEL, "input": "hi", "stream": True, "fake_chunks": 2})
    events = [e for e in content.split(b"\n\n") if e.strip()]
    payloads = [jsonutil.loads(e.split(b"data: ", 1)[1]) for e in events]
    assert [p["sequence_number"] for p in payloads] == list(range(len(payloads)))
    last = payloads[-1]
    assert last["type"] == "response.completed" and last["response"]["status"] == "incomplete"
    assert last["response"]["usage"]["output_tokens"] == 3
    assert last["response"]["output"][0]["content"][0]["text"] == "héhé"
    assert fake.last_request().body["stream_options"] == {"include_usage": True}


@pytest_twisted.ensureDeferred
async def test_responses_unknown_model_is_not_mistaken_for_a_missing_route(http, gateway, fake):
    response, content = await post_json(http, gateway.url + "/v1/responses",
                                        {"model": "vllm/other", "input": "hi"})
    assert response.code == 404
    with pytest.raises(Exception):
        # No chat fallback happened for a real 404 from the upstream.
        [r for r in fake.requests if r.path == b"/v1/chat/completions"][0]


def chat_chunk(delta, finish=None):
    """One chat stream chunk's JSON text (for the fake's C{fake_sse})."""
    return json.dumps({"id": "chatcmpl-x", "object": "chat.completion.chunk", "model": UPSTREAM,
                       "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})


def stream_events(client, **kwargs):
    """The event types of a Responses stream through the SDK, what it raised (None if nothing), and what it was
    told of the error: its in-band C{error} event's message, or the error answer's (None without either)."""
    import openai

    kinds, said = [], None
    try:
        with client.responses.stream(model=MODEL, input="hi", **kwargs) as events:
            for event in events:
                kinds.append(event.type)
                if event.type == "error":
                    said = event.message
    except Exception as e:  # noqa: BLE001 - what the client saw is the point
        if isinstance(e, openai.APIStatusError):  # (nothing went out before the error: a 502, never an event)
            said = e.message
        return kinds, e, said
    return kinds, None, said


@pytest.mark.parametrize("finish", ["abort", "error"])
@pytest_twisted.ensureDeferred
async def test_a_translated_generation_the_upstream_aborted_is_an_error_never_a_completed_response(translating,
                                                                                                   finish):
    import openai

    gw, fake = translating
    client = openai_client(gw)
    try:
        sse = [chat_chunk({"role": "assistant", "content": ""}), chat_chunk({"content": "half"}, finish), "[DONE]"]
        kinds, raised, said = await in_thread(stream_events, client, extra_body={"fake_sse": sse})
        assert isinstance(raised, openai.APIError) and finish in said
        assert "response.completed" not in kinds
        aborted = {"id": "c", "object": "chat.completion", "model": UPSTREAM, "choices": [
            {"index": 0, "message": {"role": "assistant", "content": "half"}, "finish_reason": finish}]}
        with pytest.raises(openai.APIStatusError) as whole:
            await in_thread(client.responses.create, model=MODEL, input="hi",
                            extra_body={"fake_status": 200, "fake_body": json.dumps(aborted)})
        assert whole.value.status_code == 502 and finish in whole.value.message
    finally:
        client.close()


@pytest_twisted.ensureDeferred
async def test_a_whole_or_unreadable_chat_answer_to_a_translated_responses_request(translating, http):
    import openai

    gw, fake = translating
    chat = {"id": "c", "object": "chat.completion", "model": UPSTREAM, "choices": [
        {"index": 0, "finish_reason": "tool_calls", "message": {
            "role": "assistant", "content": "Checking.",
            "tool_calls": [{"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]}}],
        "usage": {"prompt_tokens": 12, "completion_tokens": 7, "total_tokens": 19}}
    whole = {"fake_status": 200, "fake_body": json.dumps(chat)}  # an upstream that ignores "stream"
    await post_json(http, gw.url + "/v1/responses", {"model": MODEL, "input": "hi"})  # (no /responses: learnt)
    response, content = await post_json(http, gw.url + "/v1/responses",
                                        {"model": MODEL, "input": "hi", "stream": True, **whole})
    assert response.headers.getRawHeaders("content-type")[0].startswith("text/event-stream")
    assert b"chat.completion" not in content
    client = openai_client(gw)
    try:
        def stream():
            with client.responses.stream(model=MODEL, input="hi", extra_body=whole) as events:
                return [e.type for e in events], events.get_final_response()

        kinds, final = await in_thread(stream)
        assert kinds[0] == "response.created" and kinds[-1] == "response.completed"
        assert final.output_text == "Checking." and final.output[1].call_id == "call_1"
        assert (final.usage.input_tokens, final.usage.output_tokens) == (12, 7)
        # What is no chat completion with a choice (a 200 with an error, HTML) is a 502, never a response.
        for body in (json.dumps({"error": {"message": "overloaded"}}), "<html>oops</html>", ""):
            for stream_it in (True, False):
                response, content = await post_json(http, gw.url + "/v1/responses", {
                    "model": MODEL, "input": "hi", "stream": stream_it, "fake_status": 200, "fake_body": body})
                assert response.code == 502, (body, stream_it, content)
                assert jsonutil.loads(content)["error"]["type"] == "provider_error"
        kinds, raised, _ = await in_thread(stream_events, client,
                                           extra_body={"fake_status": 200, "fake_body": "<html>oops</html>"})
        assert isinstance(raised, openai.APIStatusError) and raised.status_code == 502 and not kinds
    finally:
        client.close()


@pytest_twisted.ensureDeferred
async def test_a_translated_responses_stream_with_an_event_that_is_no_chat_chunk_ends_in_an_error(translating):
    import openai

    gw, fake = translating
    client = openai_client(gw)
    try:
        for odd in (chat_chunk({"content": "B"})[:30], "[1, 2]", "not json"):  # cut short, no object, no JSON
            sse = [chat_chunk({"role": "assistant", "content": "A"}), odd, chat_chunk({"content": "C"}, "stop"),
                   "[DONE]"]
            kinds, raised, said = await in_thread(stream_events, client, extra_body={"fake_sse": sse})
            assert isinstance(raised, openai.APIError) and "no JSON object" in said, (odd, raised)
            assert "response.completed" not in kinds  # never a response that silently lacks "B"
            # The first event already odd: nothing went out, so the error is the answer (a 502), never a 200
            # whose only event is an error (which the SDK's stream reads as no response.created).
            kinds, raised, said = await in_thread(stream_events, client, extra_body={"fake_sse": sse[1:]})
            assert isinstance(raised, openai.APIStatusError) and raised.status_code == 502 and not kinds, raised
            assert raised.code == "stream_incomplete" and "no JSON object" in said
    finally:
        client.close()


@pytest_twisted.ensureDeferred
async def test_an_in_band_error_of_a_translated_responses_stream_never_shows_the_upstreams_address(translating):
    gw, fake = translating
    error = {"error": {"message": f"Engine at {fake.base_url}/chat/completions died.", "type": "InternalServerError"}}
    client = openai_client(gw)
    try:
        sse = [chat_chunk({"role": "assistant", "content": "A"}), json.dumps(error)]
        kinds, raised, said = await in_thread(stream_events, client, extra_body={"fake_sse": sse})
        seen, _ = await in_thread(created_events, client, extra_body={"fake_sse": sse, "fake_pace": 0.05})
        assert_error_event(seen, "server_error", "Engine at vllm/chat/completions died")  # (its in-band error, its own event)
    finally:
        client.close()
    # (its own error event, then the stream's end: the SDK hands it to the client as a ResponseErrorEvent)
    assert raised is None and kinds[-1] == "error" and "response.completed" not in kinds, (kinds, raised)
    assert "Engine at vllm/chat/completions died" in said
    assert fake.root_url.split("//")[1] not in said  # (host and port)


@pytest_twisted.ensureDeferred
async def test_a_translated_answer_the_upstream_filtered_is_incomplete_for_its_content(translating, http):
    gw, fake = translating
    await post_json(http, gw.url + "/v1/responses", {"model": MODEL, "input": "hi"})  # (no /responses: learnt)
    client = openai_client(gw)
    try:
        filtered = {"id": "c", "object": "chat.completion", "model": UPSTREAM, "choices": [
            {"index": 0, "message": {"role": "assistant", "content": "I"}, "finish_reason": "content_filter"}]}
        response = await in_thread(client.responses.create, model=MODEL, input="hi",
                                   extra_body={"fake_status": 200, "fake_body": json.dumps(filtered)})
        assert response.status == "incomplete" and response.incomplete_details.reason == "content_filter"

        def stream():
            sse = [chat_chunk({"role": "assistant", "content": "I"}), chat_chunk({}, "content_filter"), "[DONE]"]
            with client.responses.stream(model=MODEL, input="hi", extra_body={"fake_sse": sse}) as events:
                return [e.type for e in events], events.get_final_response()

        kinds, final = await in_thread(stream)
        assert kinds[-1] == "response.completed"  # (the event vLLM's own stream ends with, whatever the status)
        assert final.status == "incomplete" and final.incomplete_details.reason == "content_filter"
    finally:
        client.close()


@pytest_twisted.ensureDeferred
async def test_a_translated_stream_carries_the_models_reasoning_as_the_plain_answer_does(translating, http):
    """The chat stream's reasoning deltas become a reasoning item with its events, in the final and the kept
    response, as a plain create's answer has it (before: streamed, the reasoning was dropped)."""
    gw, fake = translating
    await post_json(http, gw.url + "/v1/responses", {"model": MODEL, "input": "hi"})  # (no /responses: learnt)
    client = openai_client(gw)
    try:
        def stream(**extra):
            with client.responses.stream(model=MODEL, input="hi", extra_body=dict(extra, fake_reasoning="deep thought")
                                         ) as events:
                return [e.type for e in events], events.get_final_response()

        kinds, final = await in_thread(stream)
        assert kinds[:5] == ["response.created", "response.in_progress", "response.output_item.added",
                             "response.content_part.added", "response.reasoning_text.delta"]
        assert "response.reasoning_text.done" in kinds
        plain = await in_thread(client.responses.create, model=MODEL, input="hi",
                                extra_body={"fake_reasoning": "deep thought"})
        for response in (final, await in_thread(client.responses.retrieve, final.id), plain):
            assert [item.type for item in response.output] == ["reasoning", "message"]
            assert response.output[0].content[0].text == "deep thought" and response.output_text == "héhéhé"
        answer = {"id": "c", "object": "chat.completion", "model": UPSTREAM, "choices": [{"index": 0, "message": {
            "role": "assistant", "content": "I", "reasoning_content": "deep thought"}, "finish_reason": "stop"}]}
        _, whole = await in_thread(stream, fake_status=200, fake_body=json.dumps(answer))  # (answered whole)
        assert [item.type for item in whole.output] == ["reasoning", "message"]
        assert whole.output[0].content[0].text == "deep thought"
    finally:
        client.close()


@pytest_twisted.ensureDeferred
async def test_a_translated_tool_output_given_as_content_parts_reaches_the_model_as_its_text(translating, http):
    """A function_call_output's output may be a list of content parts (OpenAI's text, image or file output): its
    text goes as the tool message's content (before: the parts' JSON, which the model read as the output)."""
    gw, fake = translating
    call = {"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{}"}
    for output, content in (([{"type": "input_text", "text": "sun"}, {"type": "input_text", "text": "ny"}], "sunny"),
                            ([{"type": "input_image", "image_url": "data:image/png;base64,AA"}],
                             [{"type": "image_url", "image_url": {"url": "data:image/png;base64,AA"}}]),
                            ({"temperature": 20}, '{"temperature":20}'), ("plain", "plain")):
        body = {"model": MODEL, "input": [call, {"type": "function_call_output", "call_id": "c1", "output": output}]}
        response, _ = await post_json(http, gw.url + "/v1/responses", body)
        assert response.code == 200
        assert fake.last_request().body["messages"][-1] == {"role": "tool", "tool_call_id": "c1", "content": content}


@pytest_twisted.ensureDeferred
async def test_a_translated_turn_that_said_something_and_called_a_tool_is_one_assistant_message(translating, http):
    """Its message and function_call items (a stored turn replayed, or a client's history) make one assistant
    message, as the chat API has a turn (before: two assistant messages in a row, which templates that
    want the roles to alternate refuse)."""
    gw, fake = translating
    body = {"model": MODEL, "input": [
        {"role": "user", "content": "weather?"}, {"role": "assistant", "content": "Let me look."},
        {"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{}"},
        {"type": "function_call", "call_id": "c2", "name": "g", "arguments": "{}"},
        {"type": "function_call_output", "call_id": "c1", "output": "sunny"},
        {"type": "function_call_output", "call_id": "c2", "output": "warm"}]}
    response, _ = await post_json(http, gw.url + "/v1/responses", body)
    assert response.code == 200
    assert fake.last_request().body["messages"] == [
        {"role": "user", "content": "weather?"},
        {"role": "assistant", "content": "Let me look.", "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}},
            {"id": "c2", "type": "function", "function": {"name": "g", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
        {"role": "tool", "tool_call_id": "c2", "content": "warm"}]


@pytest_twisted.ensureDeferred
async def test_a_translated_answer_keeps_the_logprobs_it_asked_the_upstream_for(translating, http):
    """C{top_logprobs} (or C{include} C{message.output_text.logprobs}) asks the chat upstream for logprobs; they
    are the output text's, plain and streamed (before: asked for, then dropped: always [])."""
    gw, fake = translating
    await post_json(http, gw.url + "/v1/responses", {"model": MODEL, "input": "hi"})  # (no /responses: learnt)
    client = openai_client(gw)

    def logprob(token):
        return {"token": token, "logprob": -0.5, "bytes": list(token.encode()),
                "top_logprobs": [{"token": token, "logprob": -0.5, "bytes": list(token.encode())}]}

    try:
        answer = {"id": "c", "object": "chat.completion", "model": UPSTREAM, "choices": [{
            "index": 0, "message": {"role": "assistant", "content": "Hi"}, "finish_reason": "stop",
            "logprobs": {"content": [logprob("Hi")]}}]}
        plain = await in_thread(client.responses.create, model=MODEL, input="hi", top_logprobs=1,
                                extra_body={"fake_status": 200, "fake_body": json.dumps(answer)})
        assert fake.last_request().body["logprobs"] is True and fake.last_request().body["top_logprobs"] == 1
        assert [p.token for p in plain.output[0].content[0].logprobs] == ["Hi"]

        def stream():
            sse = [json.dumps({"id": "c", "object": "chat.completion.chunk", "model": UPSTREAM, "choices": [{
                "index": 0, "delta": {"content": token}, "finish_reason": None,
                "logprobs": {"content": [logprob(token)]}}]}) for token in ("H", "i")] + [
                chat_chunk({}, "stop"), "[DONE]"]
            with client.responses.stream(model=MODEL, input="hi", include=["message.output_text.logprobs"],
                                         extra_body={"fake_sse": sse}) as events:
                deltas = [[p.token for p in e.logprobs] for e in events if e.type == "response.output_text.delta"]
                return deltas, events.get_final_response()

        deltas, final = await in_thread(stream)
        assert fake.last_request().body["logprobs"] is True and "top_logprobs" not in fake.last_request().body
        assert deltas == [["H"], ["i"]] and [p.token for p in final.output[0].content[0].logprobs] == ["H", "i"]
    finally:
        client.close()


@pytest_twisted.ensureDeferred
async def test_a_translated_response_names_the_reasoning_effort_it_was_made_with(translating, http):
    """The effort asked for goes to the chat upstream as C{reasoning_effort}; the response says it, plain and
    streamed, as OpenAI's does (before: always null)."""
    gw, fake = translating
    await post_json(http, gw.url + "/v1/responses", {"model": MODEL, "input": "hi"})  # (no /responses: learnt)
    for stream in (False, True):
        response, content = await post_json(http, gw.url + "/v1/responses", {
            "model": MODEL, "input": "hi", "stream": stream, "reasoning": {"effort": "high", "summary": "auto"}})
        final = json.loads(content) if not stream else json.loads(content.rsplit(b"data: ", 1)[1])["response"]
        assert fake.last_request().body["reasoning_effort"] == "high"
        assert final["reasoning"] == {"effort": "high", "summary": "auto"}
