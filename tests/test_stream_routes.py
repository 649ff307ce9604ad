"""Every streamed route over real sockets: a client that stops reading, one that leaves, an upstream that breaks.

Chat completions is covered most in test_streaming.py; here each of the others (text completions, native and
translated Responses, native and translated Messages, a passthrough stream) meets the same three faults:

  - a client that stops reading: the gateway holds a bounded amount for it, and its upstream's writes block;
  - a client that leaves mid-stream: the upstream connection is closed at once (vLLM aborts the generation);
  - an upstream that breaks mid-stream (reset, a truncated chunk, half an event): the client gets the route's
    error form and never its stream's proper end, and the request is logged as failed.
"""

import json
from functools import partial

import httpx2 as httpx  # (what the openai and anthropic SDKs are built on: httpx, renamed)
import pytest
import pytest_twisted

from tests.rawclient import connect
from tests.support import (assert_upstream_closed_promptly, settled, start_fake, start_gateway, stop_all,
                           track_connections, with_timeout, write_buffer)

UPSTREAM_MODEL = "meta-llama/Llama-3.1-8B-Instruct"
MODEL = "vllm/" + UPSTREAM_MODEL
HI = [{"role": "user", "content": "hi"}]

# name: (path, body, the fake's options, the route's proper end, its error form's marker)
ROUTES = {
    "chat": (b"/v1/chat/completions", {"model": MODEL, "messages": HI}, {}, b"data: [DONE]", b"stream_incomplete"),
    "completions": (b"/v1/completions", {"model": MODEL, "prompt": "hi"}, {}, b"data: [DONE]", b"stream_incomplete"),
    "responses": (b"/v1/responses", {"model": MODEL, "input": "hi"}, {}, b"response.completed", b"event: error"),
    "responses-translated": (b"/v1/responses", {"model": MODEL, "input": "hi"}, {"responses": False},
                             b"response.completed", b"event: error"),
    "messages": (b"/v1/messages", {"model": MODEL, "max_tokens": 8, "messages": HI}, {}, b"message_stop",
                 b"event: error"),
    "messages-translated": (b"/v1/messages", {"model": MODEL, "max_tokens": 8, "messages": HI}, {"messages": False},
                            b"message_stop", b"event: error"),
    "passthrough": (b"/p/vllm/v1/chat/completions", {"model": UPSTREAM_MODEL, "messages": HI}, {}, b"data: [DONE]",
                    b"stream_incomplete"),
    "passthrough-responses": (b"/p/vllm/v1/responses", {"model": UPSTREAM_MODEL, "input": "hi"}, {},
                              b"response.completed", b"stream_incomplete"),
    "passthrough-messages": (b"/p/vllm/v1/messages", {"model": UPSTREAM_MODEL, "max_tokens": 8, "messages": HI}, {},
                             b"message_stop", b"event: error"),
}
# The upstream dialect of each route's stream, where it is not chat's.
DIALECTS = {"completions": "completions", "responses": "responses", "messages": "messages",
            "passthrough-responses": "responses", "passthrough-messages": "messages"}


def request_bytes(path, body, headers=b"", stream=True):
    data = json.dumps(dict(body, stream=True) if stream else body).encode()
    return (b"POST " + path + b" HTTP/1.1\r\nHost: gateway\r\nContent-Type: application/json\r\n" + headers
            + b"Content-Length: %d\r\n\r\n" % len(data) + data)


async def route_gateway(reactor, name, env=None):
    path, body, options, _, _ = ROUTES[name]
    fake = await start_fake(reactor, **options)
    gw = await start_gateway(reactor, dict({"VLLM_BASE_URL": fake.base_url}, **(env or {})))
    return fake, gw, path, body


def assert_released(gw):
    """Nothing of a stream that ended is left held at its replica (its slot, its relay)."""
    for pool in gw.registry.providers:
        assert [(r.in_flight, len(r.streams)) for r in pool.replicas] == [(0, 0)] * len(pool.replicas)


def metric(gw, name, **labels) -> float:
    """The sum of the gateway's C{name} samples with C{labels}."""
    from prometheus_client import generate_latest

    from tests.test_metrics import samples, value

    return value(samples(generate_latest(gw.service.metrics.registry).decode()), name, **labels)


def streamed(record):
    return record.method == b"POST" and record.path != b"/v1/messages/count_tokens"


@pytest.mark.parametrize("name", sorted(ROUTES))
@pytest_twisted.ensureDeferred
async def test_a_client_that_stops_reading_holds_back_the_upstream(reactor, name):
    fake, gw, path, body = await route_gateway(reactor, name)
    try:
        connections = track_connections(gw)
        flood = 64 * 1024 * 1024
        fake.steer = {"fake_flood": flood}  # (the fields of a translated request's body are not all forwarded)
        client = await connect(reactor, gw.port, request_bytes(path, body))
        await with_timeout(reactor, client.wait_for(b"x" * 100), 5)
        client.transport.pauseProducing()  # the client stops reading
        record = [r for r in fake.requests if streamed(r)][-1]
        written = await settled(reactor, lambda: record.bytes_written)
        assert record.pauses > 0 and written < 32 * 1024 * 1024, f"the upstream wrote {written} bytes"
        [channel] = connections
        held = write_buffer(channel.transport)
        assert held < 1024 * 1024, f"the gateway holds {held} bytes for one paused client"
        client.transport.abortConnection()
        how, _ = await with_timeout(reactor, record.closed, 2)
        assert how == "lost"
    finally:
        await stop_all(gw, fake)


@pytest.mark.parametrize("name", sorted(ROUTES))
@pytest_twisted.ensureDeferred
async def test_a_client_that_leaves_mid_stream_closes_the_upstream(reactor, name, access):
    fake, gw, path, body = await route_gateway(reactor, name)
    try:
        logged = access.next(reactor)
        fake.steer = {"fake_flood": 64 * 1024 * 1024}
        client = await connect(reactor, gw.port, request_bytes(path, body))
        await with_timeout(reactor, client.wait_for(b"x" * 100), 5)
        record = [r for r in fake.requests if streamed(r)][-1]
        client.transport.abortConnection()
        await assert_upstream_closed_promptly(reactor, record)
        assert record.bytes_written < 64 * 1024 * 1024
        event = await with_timeout(reactor, logged, 2)
        assert_released(gw)
        assert event["outcome"] == "client_gone", event
        [pool] = gw.registry.providers
        assert pool.replicas[0].failures == 0 and pool.replicas[0].state != "down"  # (the client's doing)
    finally:
        await stop_all(gw, fake)


def upstream_path(name) -> str:
    """The upstream's path that a stream of the route C{name} comes from."""
    return "/v1/" + DIALECTS.get(name, "chat/completions")


def _raw_stream(name, events: bytes, ending: bytes) -> str:
    """An upstream's raw answer (C{fake_raw}): a chunked event stream's head, C{events} as one chunk, then
    C{ending} (the rest of the body as sent, before the connection closes)."""
    head = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
    return (head + b"%x\r\n" % len(events) + events + b"\r\n" + ending).decode()


def _first_events(name) -> bytes:
    """The first events of a stream of the route C{name}'s upstream dialect (chat where it is translated)."""
    name = DIALECTS.get(name, name)
    chunk = {"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": UPSTREAM_MODEL,
             "choices": [{"index": 0, "delta": {"role": "assistant", "content": "Hel"}, "finish_reason": None}]}
    if name == "completions":
        chunk = {"id": "c1", "object": "text_completion", "created": 1, "model": UPSTREAM_MODEL,
                 "choices": [{"index": 0, "text": "Hel", "finish_reason": None}]}
    if name == "responses":
        response = {"id": "resp_1", "object": "response", "created_at": 1, "status": "in_progress",
                    "model": UPSTREAM_MODEL, "output": []}
        return b"".join(b"event: %s\ndata: %s\n\n" % (kind.encode(), json.dumps(dict(fields, type=kind,
                                                                                         sequence_number=n)).encode())
                        for n, (kind, fields) in enumerate([
                            ("response.created", {"response": response}),
                            ("response.output_text.delta", {"item_id": "m", "output_index": 0, "content_index": 0,
                                                            "delta": "Hel"})]))
    if name == "messages":
        start = {"type": "message_start", "message": {"id": "m1", "type": "message", "role": "assistant",
                                                      "content": [], "model": UPSTREAM_MODEL, "stop_reason": None,
                                                      "usage": {"input_tokens": 5, "output_tokens": 0}}}
        block = {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}
        delta = {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Hel"}}
        return b"".join(b"event: %s\ndata: %s\n\n" % (e["type"].encode(), json.dumps(e).encode())
                        for e in (start, block, delta))
    return b"data: " + json.dumps(chunk).encode() + b"\n\n"


BREAKS = {
    "reset": lambda events: b"",  # the connection closed after the first events, no body's end
    "truncated-chunk": lambda events: b"400\r\ndata: {\"id\":",  # a chunk cut short
    "half-an-event": lambda events: b"11\r\ndata: {\"id\":\"c2\",\r\n0\r\n\r\n",  # the body ends inside an event
}


@pytest.mark.parametrize("fault", sorted(BREAKS))
@pytest.mark.parametrize("name", sorted(ROUTES))
@pytest_twisted.ensureDeferred
async def test_an_upstream_that_breaks_mid_stream_never_looks_finished(reactor, name, fault, access, logged_errors):
    fake, gw, path, body = await route_gateway(reactor, name)
    _, _, _, end, error = ROUTES[name]
    try:
        logged = access.next(reactor)
        raw = _raw_stream(name, _first_events(name), BREAKS[fault](None))
        fake.steer = {"fake_raw": raw, "fake_raw_path": upstream_path(name)}
        client = await connect(reactor, gw.port, request_bytes(path, body))
        await with_timeout(reactor, client.lost, 5)
        received = bytes(client.received)
        assert received.startswith(b"HTTP/1.1 200 "), received[:300]
        assert b"Hel" in received, received
        assert end not in received, received
        if error is not None:
            assert error in received, received
        assert not received.endswith(b"\r\n0\r\n\r\n"), received  # no clean end of the chunked body
        event = await with_timeout(reactor, logged, 2)
        assert_released(gw)
        assert event["outcome"] == "stream_broken", event
        await gw.service.usage.flush()  # (its usage record says so too, as do the metrics)
        records, _ = await gw.service.store.usage.log(0, 2e9, 10)
        assert [r["outcome"] for r in records] == ["stream_broken"], records
        gw.service.metrics.flush()
        assert metric(gw, "gomodel_upstream_errors_total") == 1
    finally:
        await stop_all(gw, fake)


@pytest.mark.parametrize("setting, said, code", [
    ("HTTP_STREAM_IDLE_TIMEOUT", b"sent nothing for too long", "stream_incomplete"),  # (an upstream silent mid-stream)
    ("HTTP_STREAM_MAX_DURATION", b"ran past its maximum duration", "stream_max_duration")])
@pytest.mark.parametrize("name", sorted(ROUTES))
@pytest_twisted.ensureDeferred
async def test_a_stream_cut_by_its_idle_or_duration_limit_ends_in_its_routes_form(reactor, name, setting, said, code,
                                                                                   access):
    fake, gw, path, body = await route_gateway(reactor, name, {setting: "300ms"})
    _, _, _, end, error = ROUTES[name]
    try:
        logged = access.next(reactor)
        fake.steer = {"fake_raw": _raw_stream(name, _first_events(name), b""), "fake_raw_hold": True,
                      "fake_raw_path": upstream_path(name)}
        client = await connect(reactor, gw.port, request_bytes(path, body))
        await with_timeout(reactor, client.lost, 5)
        received = bytes(client.received)
        assert b"Hel" in received and end not in received and error in received, received
        assert said in received and not received.endswith(b"\r\n0\r\n\r\n"), received
        how, _ = await with_timeout(reactor, [r for r in fake.requests if streamed(r)][-1].closed, 2)
        assert how == "lost"  # (so vLLM aborts)
        event = await with_timeout(reactor, logged, 2)
        assert_released(gw)
        assert (event["outcome"], event["error"]) == ("stream_broken", code), event
    finally:
        await stop_all(gw, fake)


@pytest.mark.parametrize("name", sorted(ROUTES))
@pytest_twisted.ensureDeferred
async def test_a_client_that_reads_nothing_past_the_stall_timeout_is_cut_and_so_is_its_upstream(reactor, name, access):
    fake, gw, path, body = await route_gateway(reactor, name, {"HTTP_CLIENT_STALL_TIMEOUT": "300ms"})
    try:
        logged = access.next(reactor)
        fake.steer = {"fake_flood": 64 * 1024 * 1024}
        client = await connect(reactor, gw.port, request_bytes(path, body))
        await with_timeout(reactor, client.wait_for(b"x" * 100), 5)
        client.transport.pauseProducing()
        record = [r for r in fake.requests if streamed(r)][-1]
        how, _ = await with_timeout(reactor, record.closed, 5)
        assert how == "lost"
        event = await with_timeout(reactor, logged, 5)
        assert_released(gw)
        assert event["outcome"] in ("stream_broken", "client_gone") and event["error"] == "client_stalled", event
        client.transport.resumeProducing()
        await with_timeout(reactor, client.lost, 5)
    finally:
        await stop_all(gw, fake)


ASR = "openai/whisper-large-v3"
CHUNKED = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"


def _transcription_request() -> bytes:
    from tests.test_audio import form

    data, kind = form({"model": "vllm/" + ASR, "stream": "true"})
    return (b"POST /v1/audio/transcriptions HTTP/1.1\r\nHost: gateway\r\nContent-Type: " + kind.encode()
            + b"\r\nContent-Length: %d\r\n\r\n" % len(data) + data)


def _transcription_events(count: int, text="x" * 4000) -> bytes:
    chunk = {"id": "trsc-1", "object": "transcription.chunk", "created": 1, "model": ASR,
             "choices": [{"delta": {"content": text}, "finish_reason": None, "stop_reason": None}]}
    event = b"data: " + json.dumps(chunk).encode() + b"\n\n"
    return b"".join(b"%x\r\n" % len(event) + event + b"\r\n" for _ in range(count))


@pytest.mark.parametrize("fault", ["reset", "truncated-chunk", "half-an-event"])
@pytest_twisted.ensureDeferred
async def test_a_transcription_stream_whose_upstream_breaks_never_looks_finished(reactor, fault, access):
    fake = await start_fake(reactor, models=(ASR,))
    gw = await start_gateway(reactor, {"VLLM_BASE_URL": fake.base_url})
    try:
        logged = access.next(reactor)
        fake.raw[b"/v1/audio/transcriptions"] = (CHUNKED + _transcription_events(1, "Hel") + BREAKS[fault](None),
                                                 False)
        client = await connect(reactor, gw.port, _transcription_request())
        await with_timeout(reactor, client.lost, 5)
        received = bytes(client.received)
        assert received.startswith(b"HTTP/1.1 200 ") and b"Hel" in received, received
        assert b"[DONE]" not in received and b"stream_incomplete" in received, received
        assert not received.endswith(b"\r\n0\r\n\r\n"), received
        event = await with_timeout(reactor, logged, 2)
        assert_released(gw)
        assert event["outcome"] == "stream_broken", event
    finally:
        await stop_all(gw, fake)


@pytest_twisted.ensureDeferred
async def test_a_transcription_stream_holds_back_its_upstream_for_a_paused_client_and_closes_it_as_it_leaves(reactor):
    fake = await start_fake(reactor, models=(ASR,))
    gw = await start_gateway(reactor, {"VLLM_BASE_URL": fake.base_url})
    try:
        connections = track_connections(gw)
        fake.raw[b"/v1/audio/transcriptions"] = (CHUNKED + _transcription_events(8000), True)  # (32 MB)
        client = await connect(reactor, gw.port, _transcription_request())
        await with_timeout(reactor, client.wait_for(b"x" * 100), 5)
        client.transport.pauseProducing()
        [upstream] = fake.raw_transports
        unsent = await settled(reactor, lambda: write_buffer(upstream))
        assert unsent > 1024 * 1024, "the upstream was never held back"
        [channel] = connections
        held = write_buffer(channel.transport)
        assert held < 1024 * 1024, f"the gateway holds {held} bytes for one paused client"
        [record] = [r for r in fake.requests if r.method == b"POST"]
        client.transport.abortConnection()
        await assert_upstream_closed_promptly(reactor, record)
    finally:
        await stop_all(gw, fake)


def _last_events(name) -> bytes:
    """The events that end a stream of the route C{name}'s upstream dialect (after L{_first_events})."""
    name = DIALECTS.get(name, name)
    if name == "responses":
        response = {"id": "resp_1", "object": "response", "created_at": 1, "status": "completed",
                    "model": UPSTREAM_MODEL, "output": [], "usage": {"input_tokens": 5, "output_tokens": 1,
                                                                     "total_tokens": 6}}
        return b"event: response.completed\ndata: %s\n\n" % json.dumps(
            {"type": "response.completed", "sequence_number": 2, "response": response}).encode()
    if name == "messages":
        return (b'event: content_block_stop\ndata: {"type":"content_block_stop","index":0}\n\n'
                b'event: message_delta\ndata: {"type":"message_delta","delta":{"stop_reason":"end_turn"},'
                b'"usage":{"output_tokens":1}}\n\nevent: message_stop\ndata: {"type":"message_stop"}\n\n')
    chunk = {"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": UPSTREAM_MODEL,
             "choices": [{"index": 0, "delta": {"content": "lo"}, "finish_reason": "stop"}]}
    if name == "completions":
        chunk = {"id": "c1", "object": "text_completion", "created": 1, "model": UPSTREAM_MODEL,
                 "choices": [{"index": 0, "text": "lo", "finish_reason": "stop"}]}
    return b"data: " + json.dumps(chunk).encode() + b"\n\ndata: [DONE]\n\n"


def _chunked(*pieces) -> bytes:
    return b"".join(b"%x\r\n" % len(piece) + piece + b"\r\n" for piece in pieces) + b"0\r\n\r\n"


@pytest.mark.parametrize("name", sorted(ROUTES))
@pytest_twisted.ensureDeferred
async def test_keep_alive_comments_in_an_upstreams_stream_keep_it_alive_and_break_nothing(reactor, name, access):
    fake, gw, path, body = await route_gateway(reactor, name, {"HTTP_STREAM_IDLE_TIMEOUT": "5s"})
    _, _, _, end, _ = ROUTES[name]
    try:
        logged = access.next(reactor)
        raw = (CHUNKED.replace(b"text/event-stream", b"text/event-stream; charset=utf-8")
               + _chunked(b": keep-alive\n\n", _first_events(name), b": ping\r\n\r\n", b":\n\n", _last_events(name)))
        fake.steer = {"fake_raw": raw.decode(), "fake_raw_path": upstream_path(name)}
        client = await connect(reactor, gw.port, request_bytes(path, body, b"Connection: close\r\n"))
        await with_timeout(reactor, client.lost, 5)
        received = bytes(client.received)
        assert received.startswith(b"HTTP/1.1 200 ") and end in received, received
        assert b"stream_incomplete" not in received and received.endswith(b"\r\n0\r\n\r\n"), received
        event = await with_timeout(reactor, logged, 2)
        assert_released(gw)
        assert event["outcome"] == "ok", event
    finally:
        await stop_all(gw, fake)


def _error_event(name) -> bytes:
    """An upstream's in-band error event in the route C{name}'s upstream dialect."""
    name = DIALECTS.get(name, name)
    if name == "responses":
        return (b'event: error\ndata: {"type":"error","code":"server_error","message":"engine failed",'
                b'"param":null,"sequence_number":2}\n\n')
    if name == "messages":
        return b'event: error\ndata: {"type":"error","error":{"type":"api_error","message":"engine failed"}}\n\n'
    return b'data: {"error":{"message":"engine failed","type":"InternalServerError","code":500}}\n\n'


@pytest.mark.parametrize("name", sorted(ROUTES))
@pytest_twisted.ensureDeferred
async def test_an_upstreams_error_event_mid_stream_reaches_the_client_and_is_logged_as_an_error(reactor, name, access):
    fake, gw, path, body = await route_gateway(reactor, name)
    _, _, _, end, _ = ROUTES[name]
    try:
        logged = access.next(reactor)
        raw = CHUNKED + _chunked(_first_events(name), _error_event(name))
        fake.steer = {"fake_raw": raw.decode(), "fake_raw_path": upstream_path(name)}
        client = await connect(reactor, gw.port, request_bytes(path, body, b"Connection: close\r\n"))
        await with_timeout(reactor, client.lost, 5)
        received = bytes(client.received)
        assert received.startswith(b"HTTP/1.1 200 ") and b"engine failed" in received, received
        assert end not in received and b"stream_incomplete" not in received, received
        if path.startswith(b"/v1/messages") or path.startswith(b"/v1/responses"):
            assert b"event: error\n" in received, received
        event = await with_timeout(reactor, logged, 2)
        assert_released(gw)
        assert (event["outcome"], event["error"]) == ("error", "upstream_stream_error"), event
        [pool] = gw.registry.providers
        assert pool.replicas[0].failures == 0  # (such an error may be the request's own: the replica is not held)
        await gw.service.usage.flush()
        records, _ = await gw.service.store.usage.log(0, 2e9, 10)
        assert [r["outcome"] for r in records] == ["error"], records
        gw.service.metrics.flush()
        assert metric(gw, "gomodel_upstream_errors_total", code="upstream_stream_error") == 1
    finally:
        await stop_all(gw, fake)


@pytest_twisted.async_yield_fixture()
async def translated(reactor):
    """C{(gateway, fake)}: the gateway in front of a fake vLLM without the Responses API (Responses translated to
    chat)."""
    fake = await start_fake(reactor, responses=False)
    gw = await start_gateway(reactor, {"VLLM_BASE_URL": fake.base_url})
    yield gw, fake
    await stop_all(gw, fake)


# A chat upstream's chunk of text (before its end).
HEL = {"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": UPSTREAM_MODEL,
       "choices": [{"index": 0, "delta": {"content": "Hel"}, "finish_reason": None}]}


async def _translated_responses(reactor, gw, fake, sse, **steer) -> list:
    """The event payloads a Responses client gets, its answer a whole 200, of a chat upstream's stream of C{sse}
    (chunks, or raw payloads such as C{"[DONE]"}: the fake's C{fake_sse}), translated."""
    fake.steer = dict(steer, fake_sse=[p if isinstance(p, str) else json.dumps(p) for p in sse])
    client = await connect(reactor, gw.port, request_bytes(b"/v1/responses", {"model": MODEL, "input": "hi"},
                                                           b"Connection: close\r\n"))
    await with_timeout(reactor, client.lost, 5)
    head, _, received = bytes(client.received).partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ") and received.endswith(b"\r\n0\r\n\r\n"), received
    events = [e for e in received.split(b"\n\n") if b"data: " in e]
    return [json.loads(e[e.index(b"data: ") + 6:]) for e in events]


@pytest_twisted.ensureDeferred
async def test_a_translated_responses_streams_in_band_error_is_its_error_event_and_its_kept_responses_error(
        reactor, translated, access):
    # A chat upstream's error event in a Responses stream translated from chat was raised as the stream breaking
    # off: the client got a stream_incomplete event (or, where it came in the read that held the first tokens, a
    # 502 and none of them), the request was logged stream_broken, and the replica was held for it as for a
    # reset. Now it is the stream's error event (OpenAI's ResponseErrorEvent), as on every other route.
    gw, fake = translated
    logged = access.next(reactor)
    error = {"error": {"message": "engine failed", "type": "InternalServerError", "code": 500}}
    payloads = await _translated_responses(reactor, gw, fake, [HEL, error, HEL], fake_pace=0.05)
    assert [p["type"] for p in payloads][-2:] == ["response.output_text.delta", "error"]
    assert payloads[-1] == {"type": "error", "code": "server_error", "message": "engine failed", "param": None,
                            "sequence_number": len(payloads) - 1}
    event = await with_timeout(reactor, logged, 2)
    assert_released(gw)
    assert (event["outcome"], event["error"]) == ("error", "upstream_stream_error"), event
    [pool] = gw.registry.providers
    assert pool.replicas[0].failures == 0
    kept = json.loads(await (await with_timeout(reactor, __import__("treq").get(
        gw.url + "/v1/responses/" + payloads[0]["response"]["id"]), 5)).content())
    assert kept["status"] == "failed" and kept["error"] == {"code": "server_error", "message": "engine failed"}


@pytest.mark.parametrize("headed", [False, True])
@pytest.mark.parametrize("name", sorted(ROUTES))
@pytest_twisted.ensureDeferred
async def test_a_client_that_leaves_before_the_first_event_closes_the_upstream(reactor, name, headed, access):
    fake, gw, path, body = await route_gateway(reactor, name)
    try:
        logged = access.next(reactor)
        fake.steer = {"fake_raw": CHUNKED.decode() if headed else "", "fake_raw_hold": True,
                      "fake_raw_path": upstream_path(name)}
        arrived = fake.next_request(upstream_path(name).encode())  # (a translated route asks the native one first)
        client = await connect(reactor, gw.port, request_bytes(path, body))
        record = await with_timeout(reactor, arrived, 5)
        await settled(reactor, lambda: len(fake.forwarded()), quiet=2)
        client.transport.abortConnection()
        await assert_upstream_closed_promptly(reactor, record)
        event = await with_timeout(reactor, logged, 2)
        assert_released(gw)
        assert event["outcome"] == "client_gone", event
        [pool] = gw.registry.providers
        assert pool.replicas[0].failures == 0 and pool.replicas[0].state != "down"  # (the client's doing)
    finally:
        await stop_all(gw, fake)


@pytest_twisted.ensureDeferred
async def test_a_stream_whose_upstream_sent_only_its_head_when_the_drain_runs_out_is_a_clean_503(
        reactor, logged_errors):
    # The drain's 503 for a stream whose upstream had sent its head, none of its body: the stream's relay was
    # left registered as the answer's producer (Twisted logged "Producer was not unregistered" as an error
    # for each), and the 503 carried the upstream head's headers (its own, and the stream's no-cache).
    fake = await start_fake(reactor)
    gw = await start_gateway(reactor, {"VLLM_BASE_URL": fake.base_url, "SHUTDOWN_TIMEOUT": "0.3s"})
    try:
        fake.steer = {"fake_raw": CHUNKED.replace(b"\r\n\r\n", b"\r\nX-Upstream-Own: yes\r\n\r\n").decode(),
                      "fake_raw_hold": True, "fake_raw_path": "/v1/chat/completions"}
        arrived = fake.next_request()
        client = await connect(reactor, gw.port, request_bytes(*ROUTES["chat"][:2]))
        record = await with_timeout(reactor, arrived, 5)
        await settled(reactor, lambda: len(fake.forwarded()), quiet=2)
        await with_timeout(reactor, gw.service.stopService(), 10)
        await with_timeout(reactor, client.lost, 5)
        head, _, body = bytes(client.received).partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 503 ") and json.loads(body)["error"]["code"] == "shutdown_timeout"
        assert b"x-upstream-own" not in head.lower() and b"no-cache" not in head.lower(), head
        assert b"application/json" in head, head
        how, _ = await with_timeout(reactor, record.closed, 2)
        assert how == "lost"
    finally:
        await fake.stop()


@pytest.mark.parametrize("framing", ["chunked", "length"])
@pytest.mark.parametrize("path", [b"/v1/audio/speech", b"/p/openai-other/v1/audio/speech"])
@pytest_twisted.ensureDeferred
async def test_a_speech_whose_upstream_breaks_mid_body_never_looks_whole(reactor, path, framing, access):
    fake = await start_fake(reactor, models=("tts-1",))
    fake.audio = "openai"
    gw = await start_gateway(reactor, {"OPENAI_OTHER_BASE_URL": fake.base_url, "OPENAI_OTHER_API_KEY": "sk-up"})
    try:
        logged = access.next(reactor)
        audio = b"ID3\x04" + b"\xff" * 5000
        head = b"HTTP/1.1 200 OK\r\nContent-Type: audio/mpeg\r\n"
        if framing == "chunked":
            raw = head + b"Transfer-Encoding: chunked\r\n\r\n" + b"%x\r\n" % len(audio) + audio + b"\r\n"
        else:
            raw = head + b"Content-Length: %d\r\n\r\n" % (len(audio) * 2) + audio
        fake.raw[b"/v1/audio/speech"] = (raw, False)
        model = "openai-other/tts-1" if path.startswith(b"/v1") else "tts-1"
        client = await connect(reactor, gw.port, request_bytes(path, {"model": model, "voice": "alloy", "input": "hé"},
                                                               stream=False))
        await with_timeout(reactor, client.lost, 5)
        received = bytes(client.received)
        head, _, body = received.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 ") and b"\xff" * 100 in body, received[:300]
        if b"content-length" in head.lower():
            length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
            assert len(body) < length, head
        else:
            assert not body.endswith(b"\r\n0\r\n\r\n"), body[-20:]
        event = await with_timeout(reactor, logged, 2)
        assert_released(gw)
        assert event["outcome"] == "stream_broken", event
    finally:
        await stop_all(gw, fake)


@pytest.mark.parametrize("fault", sorted(BREAKS))
@pytest_twisted.ensureDeferred
async def test_a_speech_event_stream_whose_upstream_breaks_ends_with_an_error_event(reactor, fault, access):
    fake = await start_fake(reactor, models=("tts-1",))
    fake.audio = "openai"
    gw = await start_gateway(reactor, {"OPENAI_OTHER_BASE_URL": fake.base_url, "OPENAI_OTHER_API_KEY": "sk-up"})
    try:
        logged = access.next(reactor)
        delta = b'data: {"type":"speech.audio.delta","audio":"SUQz"}\n\n'
        fake.raw[b"/v1/audio/speech"] = (CHUNKED + b"%x\r\n" % len(delta) + delta + b"\r\n" + BREAKS[fault](None),
                                         False)
        client = await connect(reactor, gw.port, request_bytes(b"/v1/audio/speech", {
            "model": "openai-other/tts-1", "voice": "alloy", "input": "hé", "stream_format": "sse"}, stream=False))
        await with_timeout(reactor, client.lost, 5)
        received = bytes(client.received)
        assert received.startswith(b"HTTP/1.1 200 ") and b"SUQz" in received, received
        assert b"stream_incomplete" in received and not received.endswith(b"\r\n0\r\n\r\n"), received
        event = await with_timeout(reactor, logged, 2)
        assert_released(gw)
        assert event["outcome"] == "stream_broken", event
    finally:
        await stop_all(gw, fake)


@pytest.mark.parametrize("name", sorted(ROUTES))
@pytest_twisted.ensureDeferred
async def test_a_client_that_leaves_at_the_streams_end_before_the_bodys_end_is_served_whole(reactor, name, access):
    # (the SDKs leave at [DONE] / message_stop, before the body's last chunk; an upstream may hold its body open)
    fake, gw, path, body = await route_gateway(reactor, name)
    _, _, _, end, _ = ROUTES[name]
    try:
        logged = access.next(reactor)
        events = _first_events(name) + _last_events(name)
        raw = CHUNKED + b"%x\r\n" % len(events) + events + b"\r\n"
        fake.steer = {"fake_raw": raw.decode(), "fake_raw_hold": True, "fake_raw_path": upstream_path(name)}
        client = await connect(reactor, gw.port, request_bytes(path, body))
        await with_timeout(reactor, client.wait_for(end), 5)
        record = [r for r in fake.requests if streamed(r)][-1]
        client.transport.abortConnection()
        how, _ = await with_timeout(reactor, record.closed, 2)
        assert how == "lost"
        event = await with_timeout(reactor, logged, 3)
        assert_released(gw)
        assert (event["status"], event["outcome"]) == (200, "ok"), event
        [pool] = gw.registry.providers
        assert pool.replicas[0].failures == 0
    finally:
        await stop_all(gw, fake)


@pytest_twisted.ensureDeferred
async def test_a_tls_client_that_stops_reading_holds_back_the_upstream(reactor, tmp_path):
    """Over a TLS listener (TLS wraps the socket: its own buffers between the relay and the kernel's)."""
    from twisted.internet import ssl
    from twisted.internet.endpoints import SSL4ClientEndpoint, connectProtocol, serverFromString

    from tests.rawclient import RawClient
    from tests.test_tap import _self_signed

    fake, gw, path, body = await route_gateway(reactor, "chat")
    listening = await serverFromString(
        reactor, f"ssl:0:interface=127.0.0.1:privateKey={_self_signed(tmp_path)}").listen(gw.service.site)
    try:
        connections = track_connections(gw)
        fake.steer = {"fake_flood": 64 * 1024 * 1024}
        client = RawClient(request_bytes(path, body))
        await connectProtocol(SSL4ClientEndpoint(reactor, "127.0.0.1", listening.getHost().port,
                                                 ssl.CertificateOptions()), client)
        await with_timeout(reactor, client.wait_for(b"x" * 100), 5)
        client.transport.pauseProducing()
        record = [r for r in fake.requests if streamed(r)][-1]
        written = await settled(reactor, lambda: record.bytes_written)
        assert record.pauses > 0 and written < 32 * 1024 * 1024, f"the upstream wrote {written} bytes"
        [channel] = connections
        tls = channel.transport  # (what the socket holds, and what TLS holds back while its handshake or a
        held = write_buffer(tls) + sum(map(len, getattr(tls, "_appSendBuffer", ())))  # renegotiation runs)
        assert held < 1024 * 1024, f"the gateway holds {held} bytes for one paused client"
        client.transport.abortConnection()
        how, _ = await with_timeout(reactor, record.closed, 2)
        assert how == "lost"
    finally:
        await listening.stopListening()
        await stop_all(gw, fake)


SDK_ROUTES = ["chat", "completions", "responses", "responses-translated", "messages", "messages-translated"]


@pytest.mark.parametrize("fault", ["reset", "half-an-event"])
@pytest.mark.parametrize("name", SDK_ROUTES)
@pytest_twisted.ensureDeferred
async def test_the_sdks_raise_on_a_stream_whose_upstream_broke(reactor, name, fault):
    """What a client's SDK makes of a broken stream: an error raised, never a stream that simply ended."""
    import anthropic
    import openai

    from tests.support import in_thread, openai_client

    fake, gw, path, body = await route_gateway(reactor, name)
    raw = _raw_stream(name, _first_events(name), BREAKS[fault](None))
    fake.steer = {"fake_raw": raw, "fake_raw_path": upstream_path(name)}
    if name.startswith("messages"):
        client = anthropic.Anthropic(base_url=gw.url, api_key="x", max_retries=0, timeout=10)
        call = partial(client.messages.create, model=MODEL, max_tokens=8, messages=HI, stream=True)
    else:
        client = openai_client(gw)
        call = {"chat": partial(client.chat.completions.create, model=MODEL, messages=HI, stream=True),
                "completions": partial(client.completions.create, model=MODEL, prompt="hi", stream=True)}.get(
            name, partial(client.responses.create, model=MODEL, input="hi", stream=True))
    try:
        with pytest.raises((openai.APIError, anthropic.APIError, httpx.HTTPError)):
            await in_thread(lambda: list(call()))
    finally:
        await stop_all(gw, fake, clients=[client])


@pytest.mark.parametrize("name", ["responses", "passthrough-responses"])
@pytest_twisted.ensureDeferred
async def test_a_responses_stream_that_ends_failed_is_logged_as_the_upstreams_error(reactor, name, access):
    # A native Responses stream whose response failed (its response.failed event, the failed response's end) was
    # logged and counted ok, its usage record too: only an error event was the upstream's in-band error.
    fake, gw, path, body = await route_gateway(reactor, name)
    try:
        logged = access.next(reactor)
        response = {"id": "resp_1", "object": "response", "created_at": 1, "status": "failed",
                    "model": UPSTREAM_MODEL, "output": [], "error": {"code": "server_error", "message": "engine failed"}}
        failed = b"event: response.failed\ndata: %s\n\n" % json.dumps(
            {"type": "response.failed", "sequence_number": 2, "response": response}).encode()
        raw = CHUNKED + _chunked(_first_events(name), failed)
        fake.steer = {"fake_raw": raw.decode(), "fake_raw_path": upstream_path(name)}
        client = await connect(reactor, gw.port, request_bytes(path, body, b"Connection: close\r\n"))
        await with_timeout(reactor, client.lost, 5)
        received = bytes(client.received)
        assert b"event: response.failed\n" in received and b"engine failed" in received, received
        assert b"stream_incomplete" not in received and received.endswith(b"\r\n0\r\n\r\n"), received
        event = await with_timeout(reactor, logged, 2)
        assert_released(gw)
        assert (event["status"], event["outcome"], event["error"]) == (200, "error", "upstream_stream_error"), event
        [pool] = gw.registry.providers
        assert pool.replicas[0].failures == 0
        await gw.service.usage.flush()
        records, _ = await gw.service.store.usage.log(0, 2e9, 10)
        assert [r["outcome"] for r in records] == ["error"], records
    finally:
        await stop_all(gw, fake)


@pytest.mark.parametrize("name", sorted(ROUTES))
@pytest_twisted.ensureDeferred
async def test_a_stream_come_whole_with_its_head_leaves_in_one_write_with_its_end(reactor, name, access, monkeypatch):
    """A short stream's upstream body, come whole with its head, goes to the client in one write: its head, its
    events and the chunked body's end together (one send, not a second for the end alone); the connection
    then serves its next request as usual."""
    from gomodel import _twistedcompat

    fake, gw, path, body = await route_gateway(reactor, name)
    _, _, _, end, _ = ROUTES[name]
    writes = []
    write = _twistedcompat._PromptServer.write

    def counted(transport, data):  # (the gateway's client connections: the fake's are plain)
        writes.append(data)
        write(transport, data)

    monkeypatch.setattr(_twistedcompat._PromptServer, "write", counted)
    try:
        fake.steer = {"fake_raw": (CHUNKED + _chunked(_first_events(name) + _last_events(name))).decode(),
                      "fake_raw_path": upstream_path(name)}
        for n in (1, 2):  # (the second on the same connection: the first's end was written once)
            logged = access.next(reactor)
            if n == 1:
                client = await connect(reactor, gw.port, request_bytes(path, body))
            else:
                client.transport.write(request_bytes(path, body))
            event = await with_timeout(reactor, logged, 5)
            assert event["outcome"] == "ok", event
            assert len(writes) == n and writes[-1].endswith(b"\r\n0\r\n\r\n") and end in writes[-1], writes
            await with_timeout(reactor, client.wait_for(writes[-1]), 5)
        received = bytes(client.received)
        assert received.count(b"0\r\n\r\n") == 2 and received.endswith(b"\r\n0\r\n\r\n"), received
        assert received.split(b"\r\n0\r\n\r\n")[1].startswith(b"HTTP/1.1 200 "), received
        client.transport.loseConnection()
        assert_released(gw)
    finally:
        await stop_all(gw, fake)


@pytest.mark.parametrize("name", sorted(ROUTES))
@pytest_twisted.ensureDeferred
async def test_a_streams_head_leaves_in_one_write_with_the_first_events_come_with_the_upstreams_head(
        reactor, name, access, monkeypatch):
    """The first events an upstream sent with its stream's head (vLLM's role chunk, a Responses stream's
    response.created) go to the client in the same write as the answer's head: one send, one packet, not the
    head on its own and the events a second send later; the stream goes on as usual, and its client leaving
    closes the upstream."""
    from gomodel import _twistedcompat

    fake, gw, path, body = await route_gateway(reactor, name)
    writes = []
    write = _twistedcompat._PromptServer.write

    def counted(transport, data):  # (the gateway's client connections: the fake's are plain)
        writes.append(data)
        write(transport, data)

    monkeypatch.setattr(_twistedcompat._PromptServer, "write", counted)
    try:
        logged = access.next(reactor)
        fake.steer = {"fake_raw": _raw_stream(name, _first_events(name), b""), "fake_raw_hold": True,
                      "fake_raw_path": upstream_path(name)}
        client = await connect(reactor, gw.port, request_bytes(path, body))
        await with_timeout(reactor, client.wait_for(b"Hel"), 5)
        assert len(writes) == 1 and writes[0].startswith(b"HTTP/1.1 200 ") and b"Hel" in writes[0], writes
        assert bytes(client.received) == writes[0]
        record = [r for r in fake.requests if streamed(r)][-1]
        client.transport.abortConnection()
        await assert_upstream_closed_promptly(reactor, record)
        event = await with_timeout(reactor, logged, 2)
        assert_released(gw)
        assert event["outcome"] == "client_gone", event
    finally:
        await stop_all(gw, fake)


@pytest_twisted.ensureDeferred
async def test_a_translated_responses_stream_ends_at_its_response_completed_whatever_its_upstream_sends_after(
        reactor, translated, access):
    # A chat upstream that went on after its [DONE] had its chunks translated after the response.completed that
    # the [DONE] made: the client got a new output item, its text deltas, after the response had ended.
    gw, fake = translated
    logged = access.next(reactor)
    after = dict(HEL, choices=[{"index": 0, "delta": {"content": "lo"}, "finish_reason": "stop"}])
    kinds = [p["type"] for p in await _translated_responses(reactor, gw, fake, [HEL, "[DONE]", after, "[DONE]"])]
    assert kinds[-1] == "response.completed" and kinds.count("response.output_text.delta") == 1, kinds
    event = await with_timeout(reactor, logged, 2)
    assert event["outcome"] == "ok", event
