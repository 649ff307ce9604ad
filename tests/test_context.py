"""The request context: completed once, after the response is over and the exchange let go (D2, D3).

Real sockets: the gateway in front of the fake vLLM; the access log's events
are collected as the gateway emits them.
"""

import json

import pytest_twisted
from twisted.internet.task import Clock
from twisted.logger import formatEvent

from gomodel.http.context import CLIENT_GONE, OK, STREAM_BROKEN, RequestContext
from tests.rawclient import chat_request, connect
from tests.support import openai_client, with_timeout

MODEL = "vllm/meta-llama/Llama-3.1-8B-Instruct"


@pytest_twisted.ensureDeferred
async def test_plain_answer_logs_its_usage(reactor, gateway, access):
    """D3: a non-streaming 200 whose body has usage is logged with its tokens."""
    logged = access.next(reactor)
    client = openai_client(gateway)
    try:
        from tests.support import in_thread

        await in_thread(client.chat.completions.create, model=MODEL, messages=[{"role": "user", "content": "hi"}])
    finally:
        client.close()
    event = await logged
    assert (event["status"], event["outcome"], event["provider"], event["model"]) == (200, OK, "vllm", MODEL)
    assert (event["prompt_tokens"], event["completion_tokens"]) == (18, 3)
    assert event["replica"] == 0 and event["stream"] is False and event["ttfb_ms"] is not None
    text = formatEvent(event)  # the line a text observer writes
    assert text.startswith("POST /v1/chat/completions 200 ") and text.endswith(
        f"ms request_id={event['request_id']} provider=vllm model={MODEL} replica=0 prompt_tokens=18 "
        "completion_tokens=3")


@pytest_twisted.ensureDeferred
async def test_stream_the_upstream_broke_is_logged_as_broken_with_its_usage(reactor, gateway, access):
    """D2: usage chunk received, no [DONE]: the line says 200 (what was sent), stream_broken, the tokens."""
    logged = access.next(reactor)
    client = await connect(reactor, gateway.port, chat_request(
        {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "stream": True, "fake_no_done": True}))
    await client.lost
    event = await logged
    assert b"stream_incomplete" in bytes(client.received)
    assert not bytes(client.received).endswith(b"0\r\n\r\n")
    assert event["status"] == 200 and event["outcome"] == STREAM_BROKEN and event["client_gone"] is False
    assert event["error"] == "stream_incomplete"
    assert event["prompt_tokens"] == 18 and event["stream"] is True
    assert formatEvent(event).endswith(" outcome=stream_broken error=stream_incomplete")  # in the text line too


@pytest_twisted.ensureDeferred
async def test_a_stream_whose_upstream_reported_an_error_in_it_is_logged_and_counted_as_its_error(
        reactor, http, fake, access):
    """vLLM's error event inside a stream it then ends ([DONE]): the client gets both, and the access log says
    outcome=error error=upstream_stream_error, as C{gomodel_upstream_errors_total} counts it (before: ok)."""
    from tests.support import start_gateway
    from tests.test_metrics import scrape, value

    gw = await start_gateway(reactor, {"VLLM_BASE_URL": fake.base_url, "GOMODEL_MASTER_KEY": "k1"})
    try:
        logged = access.next(reactor)
        chunk = {"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": MODEL,
                 "choices": [{"index": 0, "delta": {"content": "Hel"}, "finish_reason": None}]}
        error = {"error": {"message": "engine failed", "type": "InternalServerError", "code": 500}}
        client = await connect(reactor, gw.port, chat_request(
            {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "stream": True,
             "fake_sse": [json.dumps(chunk), json.dumps(error), "[DONE]"]}, headers={"Authorization": "Bearer k1"}))
        await with_timeout(reactor, client.wait_for(b"0\r\n\r\n"), 10)  # (the stream's proper end)
        client.transport.loseConnection()
        await client.lost
        event = await logged
        received = bytes(client.received)
        assert b"engine failed" in received and b"data: [DONE]" in received
        assert (event["status"], event["outcome"], event["error"]) == (200, "error", "upstream_stream_error")
        assert formatEvent(event).endswith(" outcome=error error=upstream_stream_error")
        found = await scrape(http, gw)
        assert value(found, "gomodel_upstream_errors_total", code="upstream_stream_error", model=MODEL) == 1
    finally:
        await gw.service.stopService()


@pytest_twisted.ensureDeferred
async def test_client_gone_mid_stream_is_logged_once_as_499(reactor, gateway, fake, access):
    logged = access.next(reactor)
    client = await connect(reactor, gateway.port, chat_request(
        {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "stream": True,
         "fake_chunks": 50, "fake_pace": 0.05}))
    await client.wait_for(b"data:")
    client.transport.abortConnection()
    event = await logged
    assert event["status"] == 499 and event["outcome"] == CLIENT_GONE and event["client_gone"] is True
    assert event["ttfb_ms"] is not None
    # (its prompt estimated from the request: "user" and "hi", 6 characters, 2 tokens; its output, the events sent)
    assert formatEvent(event).endswith(" replica=0 prompt_tokens=2 completion_tokens=1 outcome=client_gone")
    assert len(access.events) == 1


@pytest_twisted.ensureDeferred
async def test_error_answer_logs_its_code(reactor, gateway, http, access):
    logged = access.next(reactor)
    response = await http.post(gateway.url + "/v1/chat/completions",
                               data=json.dumps({"model": "vllm/nope", "messages": []}).encode())
    await response.content()
    event = await logged
    assert (event["status"], event["outcome"], event["error"]) == (404, "error", "model_not_found")


def test_context_completes_only_when_ended_and_released():
    done = []
    ctx = RequestContext(b"id", b"POST", b"/v1/chat/completions", Clock(), (done.append,))
    ctx.hold()
    ctx.ended(200, client_gone=False)
    assert done == []
    ctx.usage = {"prompt_tokens": 4}
    ctx.release()
    assert done == [ctx] and ctx.tokens == (4, None) and ctx.outcome == OK
    ctx.ended(200, client_gone=True)  # a second end changes nothing
    assert done == [ctx] and ctx.status == 200


def test_the_sinks_read_the_token_counts_worked_out_once_as_it_completes():
    """Its usage's counts by type are there for every sink (the usage ledger, the metrics) when it completes;
    None without usage."""
    from gomodel.accounting.tokens import tokens_by_type

    seen = []

    def sink(ctx):
        seen.append(ctx.token_counts)

    ctx = RequestContext(b"id", b"POST", b"/v1/chat/completions", Clock(), (sink, sink))
    usage = ctx.usage = {"prompt_tokens": 4, "completion_tokens": 2, "prompt_tokens_details": {"cached_tokens": 3}}
    assert ctx.token_counts is None  # not before it completes
    ctx.ended(200, client_gone=False)
    assert seen == [tokens_by_type(usage)] * 2 == [(4, 2, 3, 0)] * 2 and seen[0] is seen[1]
    bare = RequestContext(b"id", b"GET", b"/v1/models", Clock(), (sink,))
    bare.ended(200, client_gone=False)
    assert seen[2:] == [None]


def test_a_failing_sink_is_logged_and_the_others_still_run(logged_errors):
    seen = []

    def broken(ctx):
        raise RuntimeError("sink")

    ctx = RequestContext(b"id", b"GET", b"/v1/models", Clock(), (broken, seen.append))
    ctx.ended(200, client_gone=False)
    assert seen == [ctx]
    assert logged_errors.flush(RuntimeError) == 1


def test_every_sink_after_a_failing_one_runs_once_in_order(logged_errors):
    """Sinks that fail one after another, in the middle and last: each is logged, every other runs once, in order."""
    seen = []

    def broken(ctx):
        seen.append("broken")
        raise RuntimeError("sink")

    ctx = RequestContext(b"id", b"GET", b"/v1/models", Clock(),
                         (lambda c: seen.append(1), broken, broken, lambda c: seen.append(2), broken))
    ctx.ended(200, client_gone=False)
    ctx.ended(200, client_gone=False)  # (completes once)
    assert seen == [1, "broken", "broken", 2, "broken"]
    assert logged_errors.flush(RuntimeError) == 3


def test_usage_is_wanted_only_when_a_sink_reads_it():
    from gomodel.lifecycle import Drain

    counting = Drain(Clock(), [], 1.0)
    assert RequestContext(b"id", b"GET", b"/", Clock(), (counting,)).recorded is False
    assert RequestContext(b"id", b"GET", b"/", Clock(), (counting, lambda ctx: None)).recorded is True


def test_the_front_calls_a_sink_instance_through_its_bound_call_and_reads_its_own_attributes():
    """A sink whose class defines C{__call__} is called through it, bound (no slower call of the instance); whether
    usage is wanted is still read off the sinks themselves (the drain's C{reads_usage = False})."""
    from gomodel.http.front import FrontResource, called
    from gomodel.lifecycle import Drain

    def seen(ctx):
        pass

    counting = Drain(Clock(), [], 1.0)
    assert called(counting) == counting.__call__ and called(seen) is seen
    front = FrontResource(None, Clock(), sinks=(counting,))
    assert front._sinks == (counting.__call__,) and front._recorded is False
    front = FrontResource(None, Clock(), sinks=(counting, seen), bare_sinks=(seen,))
    assert front._recorded is True and front._bare_sinks == (seen,)


def test_the_site_calls_the_key_check_through_its_bound_call():
    from gomodel.auth.keys import GatewayAuth
    from gomodel.http.site import GatewaySite

    auth = GatewayAuth("mk", None)
    site = GatewaySite(None, None, authenticate=auth)
    assert site.requestFactory.authenticate == auth.__call__
