"""Streams over real sockets: backpressure, disconnects, broken upstreams, UTF-8, usage."""

import json

import pytest
import pytest_twisted
import treq

from gomodel import jsonutil
from tests.rawclient import chat_request, connect
from tests.support import (assert_upstream_closed_promptly, settled, start_fake, start_gateway, stop_all,
                           track_connections, with_timeout, write_buffer)

MODEL = "vllm/meta-llama/Llama-3.1-8B-Instruct"


def stream_body(**extra):
    return {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "stream": True, **extra}


def events_of(content: bytes):
    return [e for e in content.split(b"\n\n") if e.strip()]


@pytest_twisted.ensureDeferred
async def test_slow_client_keeps_gateway_memory_bounded_and_pauses_upstream(reactor, gateway, fake):
    connections = track_connections(gateway)
    flood = 64 * 1024 * 1024
    client = await connect(reactor, gateway.port, chat_request(stream_body(fake_flood=flood)))
    await client.wait_for(b"data: ")
    client.transport.pauseProducing()  # the client stops reading
    record = fake.last_request()
    written = await settled(reactor, lambda: record.bytes_written)
    assert record.pauses > 0
    assert written < flood, "the upstream was never held back"
    [channel] = connections
    held = write_buffer(channel.transport)
    assert held < 1024 * 1024, f"gateway holds {held} bytes for one paused client"
    # Everything else sits in kernel socket buffers, which fill and stop the upstream.
    assert written < 32 * 1024 * 1024

    client.transport.abortConnection()
    how, _ = await with_timeout(reactor, record.closed, 2)
    assert how == "lost"


@pytest_twisted.ensureDeferred
async def test_paused_client_is_not_upstream_silence(reactor, fake):
    gw = await start_gateway(reactor, {"VLLM_BASE_URL": fake.base_url, "HTTP_STREAM_IDLE_TIMEOUT": "0.3s"})
    try:
        flood = 48 * 1024 * 1024
        client = await connect(reactor, gw.port, chat_request(stream_body(fake_flood=flood)))
        await client.wait_for(b"data: ")
        client.transport.pauseProducing()
        record = fake.last_request()
        await settled(reactor, lambda: record.bytes_written, quiet=6)  # paused well past the idle timeout
        client.transport.resumeProducing()
        await with_timeout(reactor, client.wait_for(b"data: [DONE]\n\n"), 20)
        assert b"stream_incomplete" not in client.received
        assert record.bytes_written >= flood
        client.transport.loseConnection()
        await client.lost
    finally:
        await gw.service.stopService()


@pytest_twisted.ensureDeferred
async def test_client_leaving_mid_stream_closes_upstream(reactor, gateway, fake):
    client = await connect(reactor, gateway.port, chat_request(stream_body(fake_chunks=200, fake_pace=0.02)))
    await client.wait_for(b'"content":"h')
    record = fake.last_request()
    client.transport.abortConnection()
    await assert_upstream_closed_promptly(reactor, record)


@pytest_twisted.ensureDeferred
async def test_client_leaving_before_headers_closes_upstream(reactor, gateway, fake):
    for body in (stream_body(fake_hang=True), {"model": MODEL, "messages": [], "fake_hang": True}):
        arrived = fake.next_request()
        client = await connect(reactor, gateway.port, chat_request(body))
        record = await with_timeout(reactor, arrived, 2)
        client.transport.abortConnection()
        await assert_upstream_closed_promptly(reactor, record)


async def broken_stream(reactor, gateway, **fault):
    client = await connect(reactor, gateway.port, chat_request(stream_body(**fault)))
    await with_timeout(reactor, client.lost, 5)
    return bytes(client.received)


@pytest_twisted.ensureDeferred
async def test_upstream_dying_mid_stream_never_looks_finished(reactor, gateway, logged_errors):
    received = await broken_stream(reactor, gateway, fake_chunks=5, fake_die_after=3)
    assert b'"content":"h' in received
    assert b"stream_incomplete" in received  # an in-band error event ...
    assert not received.endswith(b"0\r\n\r\n")  # ... and no clean end of the chunked body
    assert b"[DONE]" not in received


@pytest_twisted.ensureDeferred
async def test_stream_without_done_is_reported_broken(reactor, gateway):
    received = await broken_stream(reactor, gateway, fake_no_done=True)
    assert b"stream_incomplete" in received
    assert b"without [DONE]" in received
    assert not received.endswith(b"0\r\n\r\n")


async def _posted(gateway, path, body):
    """Its status, and what came of its body (a cut one's too: C{<cut>}, no clean end of its chunked body)."""
    from twisted.web.client import ResponseFailed

    response = await treq.post(gateway.url + path, data=json.dumps(body).encode())
    parts = []
    try:
        await treq.collect(response, parts.append)
    except ResponseFailed:
        parts.append(b"<cut>")
    return response.code, b"".join(parts)


def _sse_chunk(content, finish=None, **extra):
    return json.dumps({"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "m",
                       "choices": [{"index": 0, "delta": {"content": content}, "finish_reason": finish, **extra}]},
                      ensure_ascii=False)  # (an "é" as its UTF-8 bytes, as vLLM writes it: fake_split_utf8 cuts it)


@pytest_twisted.ensureDeferred
async def test_a_stream_whose_done_comes_without_a_finish_reason_is_reported_broken(gateway):
    """vLLM's stream of a request its engine dropped (the engine stopped, or failed before the first token) ends
    with [DONE] though no choice said why it ended, or says vLLM's "abort": a cut, which the client is told as
    one (stream_incomplete, no [DONE]; before its first event, the 502 of an upstream that broke off), as a stream
    without [DONE] is. A stream whose last content chunk says why, with or without a usage chunk after it, in one
    read or cut across two, ends well; so does a text completion's."""
    usage = json.dumps({"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "m",
                        "choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}})

    cut = [("/v1/chat/completions", stream_body(fake_sse=payloads, fake_pace=0.02)) for payloads in (
        [_sse_chunk("a"), _sse_chunk("b"), "[DONE]"], [_sse_chunk("a"), _sse_chunk("", "abort"), usage, "[DONE]"])]
    completion = {"model": MODEL, "prompt": "hi", "stream": True, "fake_pace": 0.02}
    cut += [("/v1/completions", dict(completion, fake_finish=finish)) for finish in (None, "abort")]
    for path, body in cut:
        code, content = await _posted(gateway, path, body)
        assert code == 200 and content.count(b"stream_incomplete") == 1, content
        assert b"without a finish_reason" in content and b"[DONE]" not in content, content
    code, content = await _posted(gateway, "/v1/chat/completions", stream_body(fake_sse=["[DONE]"]))
    assert code == 502 and b"broke off" in content, content
    for payloads in ([_sse_chunk("a"), _sse_chunk("b", "stop"), "[DONE]"],
                     [_sse_chunk("a"), _sse_chunk("é", "length", stop_reason=None), usage, "[DONE]"]):
        for split in (False, True):  # (each event in one read, or cut in two: the reason found across the cut)
            code, content = await _posted(gateway, "/v1/chat/completions", stream_body(
                fake_sse=payloads, fake_split_utf8=split, fake_pace=0.02 if split else 0))
            assert code == 200 and content.endswith(b"data: [DONE]\n\n"), content
            assert b"stream_incomplete" not in content
    # The fake's own stream, each chunk cut in two reads (its last content chunk's reason in the second half, its
    # usage and [DONE] each a read of their own), the client asking for its usage or not.
    for options in (None, {"include_usage": True}):
        code, content = await _posted(gateway, "/v1/chat/completions", stream_body(
            fake_split_utf8=True, fake_pace=0.02, **({"stream_options": options} if options else {})))
        assert code == 200 and content.endswith(b"data: [DONE]\n\n"), content


def _reasons_of(content: bytes) -> dict:
    """Each choice index's finish_reason in a relayed stream (the last said, null ones skipped)."""
    reasons = {}
    for event in events_of(content):
        if event.startswith(b"data: {"):
            for choice in jsonutil.loads(event[6:]).get("choices") or ():
                if choice.get("finish_reason") is not None:
                    reasons[choice["index"]] = choice["finish_reason"]
    return reasons


@pytest_twisted.ensureDeferred
async def test_a_stream_of_several_choices_ends_well_only_once_each_said_why_it_ended(gateway):
    """With n>1 (or a text completion's prompt list) vLLM streams the choices interleaved, each ending on its own
    chunk's finish_reason. One its engine aborted ("abort") or that never said why it ended was cut, though
    another choice's reason came last: the client is told so (stream_incomplete naming it, no [DONE]), as a
    stream of one choice whose [DONE] comes without a reason is. A stream each of whose choices ended is relayed
    unchanged, in one read or many."""
    chat = "/v1/chat/completions"
    text = "/v1/completions"
    completion = {"model": MODEL, "prompt": "hi", "stream": True}
    for pace, chunks in ((0.01, 3), (0, 40)):  # (event by event; and many events in a long read, at once)
        paced = {"fake_pace": pace, "fake_chunks": chunks}
        for path, body, reasons in (
                (chat, stream_body(n=2, **paced), {0: "length", 1: "length"}),
                (chat, stream_body(n=3, fake_finishes=["stop", "length", "stop"],
                                   stream_options={"include_usage": True}, **paced),
                 {0: "stop", 1: "length", 2: "stop"}),
                (text, dict(completion, n=2, **paced), {0: "length", 1: "length"}),
                (text, dict(completion, prompt=["a", "b"], **paced), {0: "length", 1: "length"}),
                (text, dict(completion, prompt=["a", "b"], n=2, **paced), {i: "length" for i in range(4)}),
                (chat, stream_body(n=2, fake_split_utf8=True, **paced), {0: "length", 1: "length"}),
                (text, dict(completion, prompt=[1, 2, 3], **paced), {0: "length"})):  # (token ids: one prompt)
            code, content = await _posted(gateway, path, body)
            assert code == 200 and content.endswith(b"data: [DONE]\n\n"), (body, content)
            assert b"stream_incomplete" not in content and _reasons_of(content) == reasons, (body, content)
        for path, body, choice in (
                (chat, stream_body(n=2, fake_finishes=["stop", "abort"], **paced), 1),
                (chat, stream_body(n=2, fake_finishes=["abort", "stop"], **paced), 0),  # (the reason last: 1's)
                (chat, stream_body(n=2, fake_finishes=["stop", None], stream_options={"include_usage": True},
                                   **paced), 1),
                (chat, stream_body(n=3, fake_finishes=["stop", "stop", None], **paced), 2),
                (chat, stream_body(n=2, fake_finishes=["abort", "stop"], fake_split_utf8=True, **paced), 0),
                (text, dict(completion, n=2, fake_finishes=["length", "abort"], **paced), 1),
                (text, dict(completion, prompt=["a", "b"], fake_finishes=["length", None], **paced), 1),
                (text, dict(completion, prompt=["a", "b"], n=2, fake_finishes=["stop", "stop", "abort", "stop"],
                            **paced), 2)):
            code, content = await _posted(gateway, path, body)
            assert code == 200 and content.count(b"stream_incomplete") == 1, (body, content)
            assert b"[DONE]" not in content and content.endswith(b"<cut>"), (body, content)
            assert b"choice %d ended without a finish_reason" % choice in content, (body, content)
    # A choice asked for that never came at all never said why it ended either.
    one = _sse_chunk("a", "stop")
    for body in (stream_body(n=2, fake_sse=[one, "[DONE]"], fake_pace=0.01),
                 stream_body(n="2", fake_sse=[one, "[DONE]"])):  # (vLLM reads "2" as 2)
        code, content = await _posted(gateway, chat, body)
        assert code == 200 and b"choice 1 ended without a finish_reason" in content, content
        assert b"[DONE]" not in content
    # An error in band ends it as it ends a stream of one choice: the client has it, the stream is over.
    error = json.dumps({"error": {"message": "engine died", "type": "InternalServerError", "code": 500}})
    code, content = await _posted(gateway, chat, stream_body(n=2, fake_sse=[one, error, "[DONE]"]))
    assert code == 200 and b"engine died" in content and b"stream_incomplete" not in content, content
    # A whole answer (not streamed) with choices that say no reason is relayed as it came.
    code, content = await _posted(gateway, chat, dict(stream_body(n=2, fake_finish=None), stream=False))
    assert code == 200 and jsonutil.loads(content)["choices"][0]["finish_reason"] is None, content


@pytest_twisted.ensureDeferred
async def test_silent_upstream_is_cut_by_the_idle_timeout(reactor, fake):
    gw = await start_gateway(reactor, {"VLLM_BASE_URL": fake.base_url, "HTTP_STREAM_IDLE_TIMEOUT": "0.2s"})
    try:
        received = await broken_stream(reactor, gw, fake_chunks=3, fake_pace=2)
        assert b"sent nothing for too long" in received
        how, _ = await with_timeout(reactor, fake.last_request().closed, 2)
        assert how == "lost"
    finally:
        await gw.service.stopService()


@pytest_twisted.ensureDeferred
async def test_utf8_split_across_tcp_reads_arrives_intact(http, gateway, fake):
    body = stream_body(fake_split_utf8=True, fake_chunks=4, fake_text="é€")
    response = await http.post(gateway.url + "/v1/chat/completions", data=json.dumps(body).encode())
    content = await treq.content(response)
    direct = await treq.post(fake.base_url + "/chat/completions",
                             data=json.dumps(dict(body, model="meta-llama/Llama-3.1-8B-Instruct")).encode())
    direct_content = await treq.content(direct)
    assert content == direct_content  # the client did not ask for usage, nor does the direct call
    text = "".join(jsonutil.loads(e[6:])["choices"][0]["delta"].get("content", "")
                   for e in events_of(content) if e != b"data: [DONE]")
    assert text == "é€" * 4


@pytest_twisted.ensureDeferred
async def test_forced_usage_chunk_reaches_only_clients_that_asked(http, gateway, fake):
    response = await http.post(gateway.url + "/v1/chat/completions", data=json.dumps(stream_body()).encode())
    plain = events_of(await treq.content(response))
    assert fake.last_request().body["stream_options"] == {"include_usage": True}
    assert not any(b'"usage"' in e for e in plain)
    assert plain[-1] == b"data: [DONE]"

    asked = stream_body(stream_options={"include_usage": True, "continuous_usage_stats": False})
    response = await http.post(gateway.url + "/v1/chat/completions", data=json.dumps(asked).encode())
    events = events_of(await treq.content(response))
    assert fake.last_request().body["stream_options"] == asked["stream_options"]
    usage = [jsonutil.loads(e[6:]) for e in events if b'"usage"' in e]
    assert len(usage) == 1 and usage[0]["choices"] == [] and usage[0]["usage"]["completion_tokens"] == 3
    assert events[-1] == b"data: [DONE]"

    refused = stream_body(stream_options={"include_usage": False})
    response = await http.post(gateway.url + "/v1/chat/completions", data=json.dumps(refused).encode())
    assert not any(b'"usage"' in e for e in events_of(await treq.content(response)))
    assert fake.last_request().body["stream_options"] == {"include_usage": True}

    # vLLM's per-chunk usage holds only with include_usage: asked without it, the client asked for none (before:
    # the forced include_usage turned it on, usage on every chunk)
    continuous = stream_body(stream_options={"continuous_usage_stats": True})
    response = await http.post(gateway.url + "/v1/chat/completions", data=json.dumps(continuous).encode())
    assert not any(b'"usage"' in e for e in events_of(await treq.content(response)))
    assert fake.last_request().body["stream_options"] == {"include_usage": True}


@pytest_twisted.ensureDeferred
async def test_forced_usage_on_a_chunk_with_choices_reaches_only_clients_that_asked(http, gateway, fake):
    """An upstream that puts the usage on its last chunk, beside that chunk's choices (llama.cpp's server does),
    rather than on a chunk of its own: a client that did not ask for usage gets the chunk without it (before: as
    it came, the usage it had not asked for in it); one that asked gets it as it came."""
    usage = {"prompt_tokens": 7, "completion_tokens": 2, "total_tokens": 9}
    chunk = {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "m",
             "choices": [{"index": 0, "delta": {"content": "b"}, "finish_reason": "stop"}]}
    sse = [json.dumps(dict(chunk, choices=[{"index": 0, "delta": {"content": "a"}, "finish_reason": None}])),
           json.dumps(dict(chunk, usage=usage)), "[DONE]"]
    response = await http.post(gateway.url + "/v1/chat/completions", data=json.dumps(stream_body(fake_sse=sse)).encode())
    events = events_of(await treq.content(response))
    assert not any(b'"usage"' in e for e in events)
    assert [jsonutil.loads(e[6:]) for e in events[:-1]] == [json.loads(sse[0]), chunk]
    assert events[-1] == b"data: [DONE]"
    asked = stream_body(fake_sse=sse, stream_options={"include_usage": True})
    response = await http.post(gateway.url + "/v1/chat/completions", data=json.dumps(asked).encode())
    events = events_of(await treq.content(response))
    assert [e[6:] for e in events] == [s.encode() for s in sse]


async def test_a_native_responses_stream_an_upstream_answered_whole_reaches_the_client_as_events(reactor, fake):
    """An upstream's own /v1/responses that ignores "stream" answers whole: the client still gets the Responses
    stream's events, made of that response (before: the JSON as it came, which the openai SDK read as an empty
    stream, without a word); the response is kept and its usage counted; what is no response is a 502."""
    import openai

    from tests.support import in_thread, openai_client, start_gateway

    whole = {"id": "resp_w1", "object": "response", "created_at": 1, "status": "completed", "model": "m",
             "output": [{"type": "reasoning", "id": "rs_1", "summary": [], "content": [
                            {"type": "reasoning_text", "text": "Hm."}]},
                        {"type": "message", "id": "msg_1", "status": "completed", "role": "assistant", "content": [
                            {"type": "output_text", "text": "Checking.", "annotations": [], "logprobs": []}]},
                        {"type": "function_call", "id": "fc_1", "call_id": "call_1", "name": "f",
                         "arguments": "{\"a\":1}", "status": "completed"}],
             "usage": {"input_tokens": 12, "output_tokens": 7, "total_tokens": 19}, "parallel_tool_calls": True,
             "tool_choice": "auto", "tools": []}
    gw = await start_gateway(reactor, {"VLLM_BASE_URL": fake.base_url})
    client = openai_client(gw)
    try:
        def stream(body):
            return list(client.responses.create(model=MODEL, input="hi", stream=True,
                                                extra_body={"fake_status": 200, "fake_body": body}))

        def final(body):
            with client.responses.stream(model=MODEL, input="hi",
                                         extra_body={"fake_status": 200, "fake_body": body}) as events:
                return events.get_final_response()

        events = await in_thread(stream, json.dumps(whole))
        assert [e.type for e in events] == [
            "response.created", "response.in_progress",
            "response.output_item.added", "response.output_item.done",
            "response.output_item.added", "response.content_part.added", "response.output_text.delta",
            "response.output_text.done", "response.content_part.done", "response.output_item.done",
            "response.output_item.added", "response.function_call_arguments.delta",
            "response.function_call_arguments.done", "response.output_item.done", "response.completed"]
        assert [e.sequence_number for e in events] == list(range(len(events)))
        assert events[6].delta == "Checking." and events[11].delta == '{"a":1}'
        assert events[0].response.status == "in_progress" and events[0].response.output == []
        assert events[-1].response.model_dump(exclude_unset=True) == whole
        assert (await in_thread(final, json.dumps(whole))).output_text == "Checking."
        raw = await treq.post(gw.url + "/v1/responses", data=json.dumps(
            {"model": MODEL, "input": "hi", "stream": True, "fake_status": 200, "fake_body": json.dumps(whole)}).encode())
        assert raw.headers.getRawHeaders("content-type") == ["text/event-stream; charset=utf-8"]
        assert (await treq.content(raw)).startswith(b'event: response.created\ndata: {"type":"response.created",')
        kept = await in_thread(client.responses.retrieve, "resp_w1")
        assert kept.status == "completed" and kept.usage.total_tokens == 19
        cut = dict(whole, status="incomplete", incomplete_details={"reason": "max_output_tokens"})
        assert (await in_thread(stream, json.dumps(cut)))[-1].response.status == "incomplete"
        queued = dict(whole, id="resp_w2", status="queued", output=[], usage=None, background=True)
        events = await in_thread(stream, json.dumps(queued))
        assert [(e.type, e.response.status) for e in events] == [("response.created", "queued"),
                                                                 ("response.queued", "queued")]
        with pytest.raises(openai.APIStatusError) as raised:
            await in_thread(stream, json.dumps({"object": "list", "data": []}))
        assert raised.value.status_code == 502
    finally:
        client.close()
        await gw.service.stopService()


async def test_a_stream_an_upstream_answered_whole_reaches_the_client_as_events(gateway, fake):
    """An OpenAI-compatible upstream that ignores "stream" answers whole: the client still gets the stream's
    events (before: the JSON as it came, which the SDK read as an empty stream); what is no completion is a 502."""
    import openai

    from tests.support import in_thread, openai_client

    chat = {"id": "chatcmpl-w", "object": "chat.completion", "created": 1, "model": "m", "choices": [
        {"index": 0, "finish_reason": "tool_calls", "logprobs": None, "message": {
            "role": "assistant", "content": "Checking.",
            "tool_calls": [{"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]}}],
        "usage": {"prompt_tokens": 12, "completion_tokens": 7, "total_tokens": 19}}
    text = {"id": "cmpl-w", "object": "text_completion", "created": 1, "model": "m", "choices": [
        {"index": 0, "text": "Once upon", "finish_reason": "length", "logprobs": None}],
        "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}}
    client = openai_client(gateway)
    try:
        def chat_stream(body, **kwargs):
            chunks = list(client.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": "hi"}], stream=True,
                extra_body={"fake_status": 200, "fake_body": body}, **kwargs))
            return chunks

        chunks = await in_thread(chat_stream, json.dumps(chat))
        [chunk] = chunks  # (no usage chunk: the client did not ask for it)
        assert chunk.object == "chat.completion.chunk" and chunk.choices[0].delta.content == "Checking."
        assert chunk.choices[0].delta.tool_calls[0].index == 0 and chunk.choices[0].finish_reason == "tool_calls"
        chunks = await in_thread(chat_stream, json.dumps(chat), stream_options={"include_usage": True})
        assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 7
        completions = await in_thread(lambda: list(client.completions.create(
            model=MODEL, prompt="Tell me", stream=True, extra_body={"fake_status": 200, "fake_body": json.dumps(text)})))
        assert [(c.choices[0].text, c.choices[0].finish_reason) for c in completions] == [("Once upon", "length")]
        for garbled in ("<html>oops</html>", json.dumps({"error": {"message": "busy"}})):
            try:
                await in_thread(chat_stream, garbled)
            except openai.APIStatusError as e:
                assert e.status_code == 502
            else:
                raise AssertionError(f"{garbled!r} was a stream")
    finally:
        client.close()


@pytest_twisted.ensureDeferred
async def test_a_stream_whose_upstream_dies_before_its_first_event_goes_to_another_replica(reactor):
    """A vLLM that dies after its answer's head, before the first token (nothing went to the client yet):
    another replica answers; with none, the client gets a 502 envelope it may retry, not a 200 whose body is
    an error event (before: the 200 and the error event, though nothing had been relayed)."""
    import openai

    from tests.support import in_thread, openai_client, start_fake, stop_all

    dying, healthy = await start_fake(reactor), await start_fake(reactor)
    dying.steer = {"fake_die_after": 0}
    gw = await start_gateway(reactor, {"VLLM_BASE_URL": f"{dying.base_url},{healthy.base_url}",
                                       "ROUTING_STRATEGY": "round_robin"})
    client = openai_client(gw, "none")
    try:
        for _ in range(4):  # each replica first, in turn
            chunks = await in_thread(lambda: list(client.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": "hi"}], stream=True)))
            assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "héhéhé"
        assert len([r for r in dying.requests if r.path == b"/v1/chat/completions"]) >= 1
        healthy.steer = {"fake_die_after": 0}
        response = await treq.post(gw.url + "/v1/chat/completions", json=stream_body())
        body = json.loads(await treq.content(response))
        assert response.code == 502 and body["error"]["code"] == "upstream_unreachable", body
        assert "127.0.0.1" not in json.dumps(body)
        try:
            await in_thread(lambda: list(client.with_options(max_retries=0).chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": "hi"}], stream=True)))
            raise AssertionError("no error")
        except openai.InternalServerError as error:
            assert error.status_code == 502
    finally:
        await stop_all(gw, dying, healthy, clients=[client])


@pytest_twisted.ensureDeferred
async def test_a_stream_whose_upstream_sends_its_head_then_nothing_is_a_504(reactor, fake):
    """(before: a 200 whose body was the in-band error event)"""
    gw = await start_gateway(reactor, {"VLLM_BASE_URL": fake.base_url, "HTTP_STREAM_IDLE_TIMEOUT": "300ms"})
    try:
        response = await treq.post(gw.url + "/v1/chat/completions", json=stream_body(fake_die_after=0, fake_hang=True))
        body = json.loads(await treq.content(response))
        assert response.code == 504 and body["error"]["code"] == "upstream_timeout", body
    finally:
        await gw.service.stopService()


@pytest_twisted.ensureDeferred
async def test_a_stream_past_its_maximum_duration_is_a_504_before_its_first_event_and_cut_after(reactor, fake):
    """HTTP_STREAM_MAX_DURATION: a stream whose time is up before any of it went out (a long queue, a slow
    prefill) is a 504 the SDK may retry (before: a 200 whose body was only the in-band error event); one whose
    time is up while it streams ends with its stream_incomplete event, never cleanly; either way its upstream
    connection is closed, so vLLM aborts."""
    gw = await start_gateway(reactor, {"VLLM_BASE_URL": fake.base_url, "HTTP_STREAM_MAX_DURATION": "300ms"})
    try:
        response = await treq.post(gw.url + "/v1/chat/completions", json=stream_body(fake_die_after=0, fake_hang=True))
        body = json.loads(await treq.content(response))
        assert response.code == 504 and body["error"]["code"] == "upstream_timeout", body
        assert "HTTP_STREAM_MAX_DURATION" in body["error"]["message"]
        how, _ = await with_timeout(reactor, fake.last_request().closed, 2)
        assert how == "lost"
        received = await broken_stream(reactor, gw, fake_chunks=100, fake_pace=0.05)
        assert b'"content":"h' in received and b"ran past its maximum duration" in received
        assert not received.endswith(b"0\r\n\r\n") and b"[DONE]" not in received
        how, _ = await with_timeout(reactor, fake.last_request().closed, 2)
        assert how == "lost"
    finally:
        await gw.service.stopService()


@pytest_twisted.ensureDeferred
async def test_a_stream_whose_replica_sends_its_head_then_nothing_goes_to_another_replica(reactor):
    """vLLM sends a stream's head at once, its first event after the prompt's prefill: a hung engine (its
    /health still 200) or a long queue sends the head and then nothing. Nothing went to the client: as a
    replica that sends no head in time, it counts as the replica's failure and another replica answers (its
    connection closed, so vLLM aborts). Before, the client got the 504 though another replica was ready."""
    from tests.support import start_fake, stop_all

    hung, healthy = await start_fake(reactor), await start_fake(reactor)
    hung.steer = {"fake_die_after": 0, "fake_hang": True}
    gw = await start_gateway(reactor, {"VLLM_BASE_URL": f"{hung.base_url},{healthy.base_url}",
                                       "HTTP_STREAM_IDLE_TIMEOUT": "300ms", "REPLICA_FAILURE_THRESHOLD": "1000"})
    try:
        for _ in range(2):  # idle replicas take turns: one of the two goes to the hung replica first
            response = await treq.post(gw.url + "/v1/chat/completions", json=stream_body())
            body = await treq.content(response)
            assert response.code == 200 and response.headers.getRawHeaders(b"x-gomodel-replica") == [b"1"], body
            assert body.endswith(b"data: [DONE]\n\n")
        [record] = [r for r in hung.requests if r.method == b"POST"]
        how, _ = await with_timeout(reactor, record.closed, 2)
        assert how == "lost"
        [pool] = gw.registry.providers
        assert pool.replicas[0].failures == 1 and [r.in_flight for r in pool.replicas] == [0, 0]
    finally:
        await stop_all(gw, hung, healthy)


@pytest_twisted.ensureDeferred
async def test_a_translated_stream_whose_upstream_sent_only_a_comment_before_dying_is_a_502(reactor):
    """Bytes the translation turns into nothing (an SSE comment, blank lines) are no event for the client:
    an upstream that dies after them is as one that died before its first event, a 502 the SDK may retry
    (before: a 200 whose body was the in-band error event, though nothing had been relayed)."""
    from tests.support import start_fake, stop_all

    fake = await start_fake(reactor, responses=False)  # /v1/responses translated to chat completions
    gw = await start_gateway(reactor, {"VLLM_BASE_URL": fake.base_url})
    try:
        for first in (": ping\n\n", "\n\n"):
            fake.steer = {"fake_die_after": 0, "fake_first": first}
            response = await treq.post(gw.url + "/v1/responses", json={"model": MODEL, "input": "hi", "stream": True})
            body = await treq.content(response)
            assert response.code == 502, (first, response.code, body)
            assert json.loads(body)["error"]["code"] == "upstream_unreachable"
    finally:
        await stop_all(gw, fake)


@pytest_twisted.ensureDeferred
async def test_a_stream_another_replica_answered_carries_none_of_the_dead_ones_headers(reactor):
    """The head of the attempt that broke off never went out: its headers are not the answer's (before, they
    were copied onto it and stayed there, under the replica that answered)."""
    from tests.support import start_fake, stop_all

    dying, healthy = await start_fake(reactor), await start_fake(reactor)
    dying.steer = {"fake_die_after": 0, "fake_headers": {"x-dying": "yes"}}
    healthy.steer = {"fake_die_after": 0, "fake_headers": {"x-dead-too": "yes"}}
    gw = await start_gateway(reactor, {"VLLM_BASE_URL": f"{dying.base_url},{healthy.base_url}",
                                       "ROUTING_STRATEGY": "round_robin"})
    try:
        response = await treq.post(gw.url + "/v1/chat/completions", json=stream_body())
        await treq.content(response)
        assert response.code == 502
        assert not response.headers.hasHeader(b"x-dying") and not response.headers.hasHeader(b"x-dead-too")
        assert response.headers.getRawHeaders(b"content-type")[0].startswith(b"application/json")
        healthy.steer = {}
        for _ in range(2):  # each replica first, in turn
            response = await treq.post(gw.url + "/v1/chat/completions", json=stream_body())
            await treq.content(response)
            assert response.code == 200 and not response.headers.hasHeader(b"x-dying")
    finally:
        await stop_all(gw, dying, healthy)


@pytest_twisted.ensureDeferred
async def test_a_request_whose_stream_broke_before_its_body_is_not_sent_back_to_a_replica_that_refused_it(reactor):
    """Replica 2 refuses connections (still ready: its threshold is far), replica 0 sends a stream's head and
    dies: a request tried on both goes on to replica 1, the one it has not tried. Before, the replicas whose
    send had failed were forgotten once a stream broke off: the third send could go back to replica 2 (as
    round robin's turns make it here), and the client got a 502 though replica 1 was ready all along."""
    from tests.fakes.fleet import FakeReplica
    from tests.support import start_fake, stop_all
    from tests.test_routing import wait_for

    breaking, healthy = await start_fake(reactor), await start_fake(reactor)
    refusing = await FakeReplica(reactor).start()
    breaking.steer = {"fake_die_after": 0}
    gw = await start_gateway(reactor, {"VLLM_BASE_URL": f"{breaking.base_url},{healthy.base_url},{refusing.base_url}",
                                       "ROUTING_STRATEGY": "round_robin", "REPLICA_FAILURE_THRESHOLD": "1000",
                                       "REPLICA_METRICS_INTERVAL": "0"})
    try:
        [pool] = gw.registry.providers
        await wait_for(reactor, lambda: all(r.ready for r in pool.replicas))
        await refusing.refuse()  # (its kept-alive connections closed too)
        for _ in range(12):  # the turns bring up every order of the three
            response = await treq.post(gw.url + "/v1/chat/completions", json=stream_body())
            body = await treq.content(response)
            assert response.code == 200 and response.headers.getRawHeaders(b"x-gomodel-replica") == [b"1"], body
            assert body.endswith(b"data: [DONE]\n\n")
        assert [r.in_flight for r in pool.replicas] == [0, 0, 0]
    finally:
        await stop_all(gw, breaking, healthy, refusing)


@pytest_twisted.ensureDeferred
async def test_a_replica_whose_streams_break_after_their_first_bytes_is_taken_down_as_one_whose_sends_fail(reactor):
    """Replica 0 sends every stream's first events, then resets the connection (its /health still 200): three
    broken streams in a row take it down (held out, as after failed sends), and the next streams go to replica 1.
    Before, a broken stream counted for nothing, and its head had counted as a success: it kept its share of
    the streams, every one of them cut."""
    from twisted.web.client import ResponseFailed

    from tests.support import start_fake, stop_all
    from tests.test_routing import wait_for

    breaking, healthy = await start_fake(reactor), await start_fake(reactor)
    breaking.steer = {"fake_die_after": 2}
    gw = await start_gateway(reactor, {"VLLM_BASE_URL": f"{breaking.base_url},{healthy.base_url}",
                                       "REPLICA_METRICS_INTERVAL": "0"})
    try:
        [pool] = gw.registry.providers
        await wait_for(reactor, lambda: all(r.ready for r in pool.replicas))
        replicas = []
        for _ in range(10):
            response = await treq.post(gw.url + "/v1/chat/completions", json=stream_body())
            [replica] = response.headers.getRawHeaders(b"x-gomodel-replica")
            replicas.append(replica)
            try:
                body = await treq.content(response)
            except ResponseFailed:  # (cut: its error event, then no clean end)
                body = None
            assert (body is not None and body.endswith(b"data: [DONE]\n\n")) == (replica == b"1"), body
        assert replicas.count(b"0") == 3 and replicas[-4:] == [b"1"] * 4
        broken = pool.replicas[0]
        assert broken.state == "down" and broken.held_until is not None
        assert broken.last_error == "the upstream connection broke off"
        assert pool.replicas[1].failures == 0
    finally:
        await stop_all(gw, breaking, healthy)


@pytest_twisted.ensureDeferred
async def test_a_stream_another_replica_answered_whole_after_one_broke_off_is_charged_that_answers_usage(reactor):
    """Replica 0 sends a stream's head and dies before its body; replica 1 answers the stream whole (it ignores
    "stream"): the request is charged the usage of the answer it got, as such (before: the estimate of the
    attempt that broke off, its prompt and no output, kept over it; or the answer's usage marked estimated)."""
    from tests.support import start_fake, stop_all
    from tests.test_routing import wait_for

    chat = {"id": "chatcmpl-w", "object": "chat.completion", "created": 1, "model": "m", "choices": [
        {"index": 0, "finish_reason": "stop", "logprobs": None, "message": {"role": "assistant", "content": "Hi."}}],
        "usage": {"prompt_tokens": 12, "completion_tokens": 7, "total_tokens": 19}}
    breaking, whole = await start_fake(reactor), await start_fake(reactor)
    breaking.steer = {"fake_die_after": 0}
    whole.steer = {"fake_status": 200, "fake_body": json.dumps(chat)}
    gw = await start_gateway(reactor, {"VLLM_BASE_URL": f"{breaking.base_url},{whole.base_url}",
                                       "ROUTING_STRATEGY": "round_robin", "REPLICA_FAILURE_THRESHOLD": "1000",
                                       "REPLICA_METRICS_INTERVAL": "0"})
    try:
        [pool] = gw.registry.providers
        await wait_for(reactor, lambda: all(r.ready for r in pool.replicas))
        for options in ({}, {"include_usage": True}) * 2:  # (the turns send two of them to replica 0 first)
            response = await treq.post(gw.url + "/v1/chat/completions", json=stream_body(stream_options=options))
            body = await treq.content(response)
            assert response.code == 200 and response.headers.getRawHeaders(b"x-gomodel-replica") == [b"1"], body
        assert len([r for r in breaking.requests if r.method == b"POST"]) == 2
        await gw.service.usage.flush()
        records, _ = await gw.service.store.usage.log(0, 2e9, 100)
        assert [(r["input_tokens"], r["output_tokens"], r["estimated"]) for r in records] == [(12, 7, False)] * 4
    finally:
        await stop_all(gw, breaking, whole)


@pytest_twisted.ensureDeferred
async def test_an_upstream_that_gzips_what_it_may_answers_streams_and_usage_the_gateway_can_read(reactor, access):
    # A request without Accept-Encoding accepts any coding (RFC 9110 12.5.3): an upstream (or a proxy before
    # it) that gzip'd its answers sent the gateway bytes it could neither frame nor read: its replica never
    # listed its models, a stream's events never came.
    fake = await start_fake(reactor)
    fake.compress = True
    gw = await start_gateway(reactor, {"VLLM_BASE_URL": fake.base_url})
    try:
        logged = access.next(reactor)
        client = await connect(reactor, gw.port, chat_request(stream_body(stream_options={"include_usage": True}),
                                                              {"Connection": "close"}))
        await with_timeout(reactor, client.lost, 5)
        head, _, body = bytes(client.received).partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 ") and b"content-encoding" not in head.lower()
        assert b'"content":"h\xc3\xa9"' in body and b"data: [DONE]\n\n" in body
        record = await logged
        assert (record["prompt_tokens"], record["completion_tokens"]) == (18, 3)
        assert fake.last_request().header(b"accept-encoding") == "identity"
    finally:
        await stop_all(gw, fake)


@pytest.mark.parametrize("client_leaves", [True, False])
@pytest_twisted.ensureDeferred
async def test_a_passthrough_streams_usage_is_its_own_when_its_upstream_holds_the_body_open_past_its_end(
        reactor, gateway, fake, access, client_leaves):
    # The tap read a passthrough stream's usage only once its upstream's body ended: a client that left at [DONE]
    # (as the SDKs do), or an upstream that held its body open past it (cut after END_LINGER), had the stream charged
    # an estimate (2 prompt tokens, 6 events) instead of the usage chunk the client got (18 and 3).
    body = json.dumps({"model": "meta-llama/Llama-3.1-8B-Instruct", "messages": [{"role": "user", "content": "hi"}],
                       "stream": True, "stream_options": {"include_usage": True}, "fake_after_done": "hold"}).encode()
    logged = access.next(reactor)
    client = await connect(reactor, gateway.port, b"POST /p/vllm/v1/chat/completions HTTP/1.1\r\nHost: g\r\n"
                           b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
    await with_timeout(reactor, client.wait_for(b"data: [DONE]\n\n"), 5)
    if client_leaves:
        client.transport.abortConnection()
    else:
        await with_timeout(reactor, client.wait_for(b"\r\n0\r\n\r\n"), 5)  # (the body's end, after END_LINGER)
        client.transport.loseConnection()
    record = await logged
    assert (record["prompt_tokens"], record["completion_tokens"]) == (18, 3)


@pytest.mark.parametrize("path, body", [
    (b"/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}),
    (b"/v1/messages", {"model": MODEL, "max_tokens": 10, "messages": [{"role": "user", "content": "hi"}]}),
])
@pytest_twisted.ensureDeferred
async def test_a_whole_answer_an_upstream_streamed_anyway_and_held_open_past_its_end_comes_after_the_linger(
        reactor, gateway, path, body):
    # An answer asked for whole that the upstream streamed anyway was read to its body's end: an upstream holding
    # it open after [DONE] (message_stop) kept the client waiting HTTP_RESPONSE_HEADER_TIMEOUT (10 minutes), then
    # answered 504, the whole answer in hand. As a relayed stream's, its body is cut END_LINGER after its end.
    data = json.dumps(dict(body, fake_stream_anyway=True, fake_after_done="hold")).encode()
    client = await connect(reactor, gateway.port, b"POST " + path + b" HTTP/1.1\r\nHost: g\r\nConnection: close\r\n"
                           b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(data), data))
    await with_timeout(reactor, client.lost, 5)
    head, _, answer = bytes(client.received).partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 "), head
    whole = jsonutil.loads(answer)
    assert whole.get("object") == "chat.completion" or whole.get("type") == "message", whole


@pytest_twisted.ensureDeferred
async def test_an_error_event_that_ends_an_upstreams_stream_is_its_end_not_a_second_error(reactor, gateway, access):
    # An upstream that reports an error in its stream and ends it there, without [DONE]: the chat route added its
    # own stream_incomplete error event after the upstream's ("ended without [DONE]") and logged the stream as broken
    # off, where every other route (and /p/) takes an error event the client has for the stream's end.
    chunk = {"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": MODEL,
             "choices": [{"index": 0, "delta": {"content": "Hel"}, "finish_reason": None}]}
    error = {"error": {"message": "engine failed", "type": "InternalServerError", "code": 500}}
    logged = access.next(reactor)
    client = await connect(reactor, gateway.port, chat_request(stream_body(fake_sse=[json.dumps(chunk),
                                                                                     json.dumps(error)])))
    await with_timeout(reactor, client.wait_for(b"\r\n0\r\n\r\n"), 5)  # (a whole body)
    client.transport.loseConnection()
    received = bytes(client.received)
    assert b"engine failed" in received and b"stream_incomplete" not in received
    event = await logged
    assert (event["status"], event["outcome"], event["error"]) == (200, "error", "upstream_stream_error")


@pytest_twisted.ensureDeferred
async def test_a_relayed_stream_tells_caches_and_proxies_not_to_hold_it_and_a_whole_answer_does_not(gateway, fake):
    """A relayed event stream's answer says C{Cache-Control: no-cache} (in place of the upstream's own) and
    C{X-Accel-Buffering: no} (nginx in front relays it as it comes), natively and through the passthrough; a whole
    answer keeps its upstream's Cache-Control and says nothing of buffering."""
    from tests.support import in_thread, openai_client

    def create(base_url, model, stream):
        """The answer's headers and what it said (read whole, off the reactor's thread)."""
        client = openai_client(gateway)
        try:
            raw = client.with_options(base_url=base_url).chat.completions.with_raw_response.create(
                model=model, messages=[{"role": "user", "content": "hi"}], stream=stream,
                extra_body={"fake_headers": {"Cache-Control": "max-age=60"}})
            answer = raw.parse()
            said = [event.choices[0].finish_reason for event in answer] if stream else answer.choices[0].finish_reason
            return raw.http_response.headers, said
        finally:
            client.close()

    native, passthrough = (gateway.url + "/v1", MODEL), (gateway.url + "/p/vllm/v1", "meta-llama/Llama-3.1-8B-Instruct")
    for base_url, model in (native, passthrough):
        headers, said = await in_thread(create, base_url, model, True)
        assert said[-1] == "length"  # (read to its end)
        assert headers.get_list("cache-control") == ["no-cache"] and headers.get_list("x-accel-buffering") == ["no"]
    headers, said = await in_thread(create, gateway.url + "/v1", MODEL, False)
    assert said == "length"
    assert headers.get_list("cache-control") == ["max-age=60"] and "x-accel-buffering" not in headers
