"""The one exchange: usage from whole answers, a client gone before the relay started (D5),
the Responses lifecycle's upstream reads (D9), and translated Responses objects (D10)."""

import ast
import gc
import json
import pathlib

import pytest_twisted
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone, ResponseFailed
from twisted.web.http_headers import Headers

import gomodel
from gomodel.config import Timeouts
from gomodel.http.context import RequestContext
from gomodel.proxy.exchange import DONE_END, RESPONSES_END, Exchange, _GatheredBody, upstream_call, usage_of
from gomodel.proxy.relay import END_LINGER
from gomodel.proxy.sse import ChatStreamObserver
from tests.support import copy_counting_bytes, ready_pool, start_fake, start_gateway

MODEL = "vllm/meta-llama/Llama-3.1-8B-Instruct"


def test_usage_of_reads_the_top_level_usage_without_the_rest():
    body = (b'{"id":"x","choices":[{"message":{"content":"the \\"usage\\": {} text"}}],'
            b'"usage":{"prompt_tokens":5,"completion_tokens":2,"prompt_tokens_details":{"cached_tokens":1}}}')
    assert usage_of(body) == {"prompt_tokens": 5, "completion_tokens": 2, "prompt_tokens_details": {"cached_tokens": 1}}
    assert usage_of(b'{"data":[[0.1,0.2]],"usage": {"prompt_tokens":3,"total_tokens":3}}') == {
        "prompt_tokens": 3, "total_tokens": 3}
    assert usage_of(b'{"usage":null,"x":{"a":1}}') is None
    assert usage_of(b'{"choices":[]}') is None
    assert usage_of(b'{"usage":{"broken"') is None
    # braces that balance only further on: nested details, and a brace inside a string
    assert usage_of(b'{"usage":{"a":{"b":{"c":1}},"d":2}}') == {"a": {"b": {"c": 1}}, "d": 2}
    assert usage_of(b'{"usage":{"note":"}{","n":1}}') == {"note": "}{", "n": 1}


class _GoneRequest:
    """A request whose client left before the relay could register with it."""

    channel = None
    responseHeaders = Headers()

    def setResponseCode(self, code):
        pass

    def setHeader(self, name, value):
        pass


class _Pool:
    """What a relay reads of the provider's pool."""

    name, hidden, hidden_pattern, renamed = "u", (), None, {}


class _BrokenResponse:
    """An upstream answer whose body breaks off as soon as a protocol takes it."""

    code = 200
    headers = Headers({b"content-type": [b"text/event-stream"]})

    def deliverBody(self, protocol):
        protocol.makeConnection(_Transport())
        protocol.connectionLost(Failure(ResponseFailed([Failure(ConnectionError("reset"))])))


class _Transport:
    def stopProducing(self):
        pass

    def pauseProducing(self):
        pass

    def resumeProducing(self):
        pass


def test_client_gone_before_the_relay_started_leaves_no_unhandled_error(logged_errors):
    """D5: the relay's finished Deferred is consumed even when nobody waits on it."""
    clock = Clock()
    exchange = Exchange(clock, Timeouts())
    ctx = RequestContext(b"id", b"POST", b"/v1/chat/completions", clock)
    d = Deferred.fromCoroutine(exchange._relay_stream(_GoneRequest(), ctx, _Pool(), _BrokenResponse(),
                                                      ChatStreamObserver(False), True))
    assert d.result is None
    del d
    gc.collect()
    assert not logged_errors


@pytest_twisted.ensureDeferred
async def test_responses_404_too_large_to_read_is_the_upstreams_404_not_a_500(reactor, gateway, http):
    """D9: a 404 body past the read limit was an internal_error 500."""
    response = await http.post(gateway.url + "/v1/responses", data=json.dumps({
        "model": MODEL, "input": "hi", "fake_status": 404, "fake_body": "x" * (100 * 1024)}).encode())
    body = json.loads(await response.content())
    assert response.code == 404 and body["error"]["code"] != "internal_error"


@pytest_twisted.ensureDeferred
async def test_translated_response_says_it_is_stored_and_what_it_follows(reactor, http):
    """D10: a Responses object translated from chat claimed store=false and no previous_response_id."""
    fake = await start_fake(reactor, responses=False)
    gw = await start_gateway(reactor, {"VLLM_BASE_URL": fake.base_url})
    try:
        first = await http.post(gw.url + "/v1/responses", data=json.dumps({"model": MODEL, "input": "hi"}).encode())
        first = json.loads(await first.content())
        assert first["store"] is True and first["previous_response_id"] is None
        assert abs(first["created_at"] - reactor.seconds()) < 5
        second = await http.post(gw.url + "/v1/responses", data=json.dumps(
            {"model": MODEL, "input": "more", "previous_response_id": first["id"], "stream": True}).encode())
        events = [json.loads(line[6:]) for line in (await second.content()).decode().splitlines()
                  if line.startswith("data: ")]
        completed = events[-1]["response"]
        assert completed["previous_response_id"] == first["id"] and completed["store"] is True
        unstored = await http.post(gw.url + "/v1/responses", data=json.dumps(
            {"model": MODEL, "input": "hi", "store": False}).encode())
        assert json.loads(await unstored.content())["store"] is False
    finally:
        await gw.service.stopService()
        await fake.stop()


def test_fetch_reads_the_whole_answer_of_any_status():
    class Upstream:
        name, type, hidden = "u", "vllm", ()

        def url(self, path, native=False):
            return "http://u" + path

        async def send(self, method, url, body, request_id, headers=None, content_type=None):
            return _Whole(503, b'{"error":"busy"}')

    class _Whole:
        def __init__(self, code, body):
            self.code, self._body, self.headers = code, body, Headers()

        def deliverBody(self, protocol):
            from twisted.web.client import ResponseDone

            protocol.makeConnection(_Transport())
            protocol.dataReceived(self._body)
            protocol.connectionLost(Failure(ResponseDone()))

    clock = Clock()
    pool = ready_pool(Upstream(), clock)
    d = Deferred.fromCoroutine(Exchange(clock, Timeouts()).fetch(b"id", pool, upstream_call("/x")))
    fetched = d.result
    assert (fetched.response.code, fetched.body) == (503, b'{"error":"busy"}')
    assert (fetched.upstream, fetched.model) == (pool, None)
    assert pool.replicas[0].in_flight == 0  # the lease ended with the read
    assert not clock.getDelayedCalls()


def test_the_usage_tap_reads_a_long_streams_last_usage_and_its_cut_end():
    """A passthrough stream far longer than the tap's tail (it keeps the last 64 KiB, trimmed now and then,
    never copied whole per read): the usage chunk at its end is read and an end inside an event found,
    whatever the reads' sizes."""
    import pytest

    from gomodel.proxy.exchange import TAP_TAIL, UsageTap
    from gomodel.proxy.sse import StreamIncomplete

    usage = {"prompt_tokens": 3, "completion_tokens": 4000, "total_tokens": 4003}
    event = b'data: {"choices": [{"delta": {"content": "' + b"x" * 100 + b'"}}]}\n\n'
    body = event * 4000 + b"data: " + json.dumps({"choices": [], "usage": usage}).encode() + b"\n\ndata: [DONE]\n\n"
    assert len(body) > 6 * TAP_TAIL
    for size in (7, 150, 4096, 100_000):
        tap = UsageTap(stream=True)
        relayed = b"".join(tap.feed(body[at:at + size]) for at in range(0, len(body), size))
        tap.finish()
        assert relayed == body and tap.usage == usage
        cut = UsageTap(stream=True)
        relayed = b"".join(cut.feed(body[at:min(at + size, len(body) - 5)]) for at in range(0, len(body) - 5, size))
        with pytest.raises(StreamIncomplete):
            cut.finish()
        assert relayed == body[:-len(b"data: [DONE]\n\n")]  # (the cut event held back)


def test_the_usage_tap_relays_whole_events_only_and_breaks_off_at_one_too_long_to_hold():
    """A passthrough event stream's tap, whatever the reads' sizes, relays whole events only (any line breaks, an
    end split between two reads); an event longer than HELD_EVENT breaks the stream off after the whole events
    before it (before: it passed as it came, so a cut inside it handed the client half an event, which the SDKs
    failed to parse: never their APIError)."""
    import pytest

    from gomodel.proxy.exchange import HELD_EVENT, UsageTap
    from gomodel.proxy.sse import StreamIncomplete

    def fed(body, size, whole=True):
        tap = UsageTap(stream=True)
        parts = [tap.feed(body[at:at + size]) for at in range(0, len(body), size)]
        assert not whole or all(part.endswith((b"\n\n", b"\r\n\r\n", b"\r\r")) for part in parts if part), parts
        return tap, b"".join(parts)

    token = b'data: {"choices":[{"delta":{"content":"data: [DONE]\\n\\n"}}]}\n\n'
    for size in (1, 2, 3, 7, 64, 4096):
        for event in (token, token.replace(b"\n", b"\r\n"), token.replace(b"\n", b"\r")):
            tap, relayed = fed(event * 3 + event[:-5], size)
            assert relayed == event * 3, (event, size)
            with pytest.raises(StreamIncomplete, match="inside an event"):
                tap.finish()
            tap, relayed = fed(event * 3 + b"\n \n", size, whole=False)  # (blank lines after the last event: no event)
            assert relayed == event * 3 + b"\n \n", (event, size)
            tap.finish()
    held = b"data: " + b"x" * (HELD_EVENT - 10) + b"\n\n"
    tap, relayed = fed(token + held + token, 64 * 1024)  # (as long as it may be: held whole, then relayed)
    assert relayed == token + held + token
    tap = UsageTap(stream=True)
    long = token + b"data: " + b"x" * (HELD_EVENT + 200_000) + b"\n\n"
    relayed = []
    with pytest.raises(StreamIncomplete, match="an upstream event exceeded %d bytes" % HELD_EVENT):
        for at in range(0, len(long), 64 * 1024):
            relayed.append(tap.feed(long[at:at + 64 * 1024]))
    assert b"".join(relayed) == token


def test_the_usage_tap_holds_a_long_event_in_small_reads_without_copying_it_per_read():
    """An event near HELD_EVENT arriving in small reads is held as its reads and joined once, when it ends: before,
    what was held was copied onto each read (1 MiB in 1 KiB reads: about 512 MiB copied, a second of the reactor's
    time per event). The reads here count what is copied onto them (and cut out of them)."""
    from gomodel.proxy.exchange import UsageTap

    Read, copied = copy_counting_bytes()

    event = b'data: {"embedding": "' + b"A" * (1024 * 1024 - 100) + b'"}\n\n'
    token = b'data: {"choices":[{"delta":{"content":"hi"}}]}\n\n'
    body = token + event + token
    tap = UsageTap(stream=True)
    relayed = b"".join(tap.feed(Read(body[at:at + 1024])) for at in range(0, len(body), 1024))
    tap.finish()
    assert relayed == body
    assert copied[0] < 2 * len(body), copied[0]  # (each byte at most twice; before: about len(body) ** 2 / 2048)


def test_the_usage_tap_notes_a_streams_in_band_error_in_any_dialect():
    """vLLM's error chunk, Anthropic's and the Responses API's error events, whatever the reads' sizes; a
    response object's null error, or the word in a token, is none."""
    from gomodel.proxy.exchange import UsageTap

    token = b'data: {"choices":[{"delta":{"content":"\\"error\\": 1"}}]}\n\n'
    error = b'data: {"error":{"message":"engine failed","code":500}}\n\n'
    anthropic = b'event: error\ndata: {"type":"error","error":{"type":"overloaded_error","message":"busy"}}\n\n'
    responses = b'event: error\ndata: {"type":"error","code":"server_error","message":"gone","param":null}\r\n\r\n'
    completed = b'event: response.completed\ndata: {"type":"response.completed","response":{"error":null}}\n\n'
    for size in (1, 7, 4096):
        for body, failed in ((token + error + b"data: [DONE]\n\n", "engine failed"), (token + anthropic, "busy"),
                             (token + responses, "gone"), (token + completed, None), (token, None)):
            tap = UsageTap(stream=True)
            assert b"".join(tap.feed(body[at:at + size]) for at in range(0, len(body), size)) == body
            assert (tap.error or {}).get("message") == failed and tap.done is (failed is not None), (body, size)


def test_the_usage_tap_finds_a_streams_end_where_its_route_has_one():
    """C{[DONE]}, C{message_stop}, a Responses stream's final event (named by its event line or only in its data),
    whatever the reads' sizes, and not a mention of it in a token; a stream of a route that has one ends
    without it only inside an event (or with its error event); one of a route without it may end anywhere."""
    import pytest

    from gomodel.proxy.exchange import DONE_END, MESSAGES_END, RESPONSES_END, UsageTap
    from gomodel.proxy.sse import StreamIncomplete

    token = b'data: {"choices":[{"delta":{"content":"data: [DONE]\\n\\nmessage_stop response.completed"}}]}\n\n'
    error = b'data: {"error":{"message":"engine failed","code":500}}\n\n'
    stop = b'event: message_stop\ndata: {"type":"message_stop"}\n\n'
    completed = b'event: response.completed\ndata: {"type":"response.completed","response":{"error":null}}\n\n'
    bare = b'data: {"response":{"status":"incomplete"},"type":"response.incomplete"}\r\n\r\n'
    for size in (1, 7, 64, 4096):
        for body, ends, done in ((token + b"data: [DONE]\n\n", DONE_END, True),
                                 (token + b"data:[DONE]\r\n\r\n: a comment\r\n\r\n", DONE_END, True),
                                 (token, DONE_END, False), (token + error, DONE_END, True),
                                 (token + stop, MESSAGES_END, True), (token, MESSAGES_END, False),
                                 (token + completed, RESPONSES_END, True), (token + bare, RESPONSES_END, True),
                                 (token, RESPONSES_END, False), (token, None, False)):
            tap = UsageTap(stream=True, ends=ends)
            assert b"".join(tap.feed(body[at:at + size]) for at in range(0, len(body), size)) == body
            assert tap.done is done, (body, size)
            if done or ends is None:
                tap.finish()
            else:
                with pytest.raises(StreamIncomplete) as raised:
                    tap.finish()
                assert str(raised.value) == "the upstream stream ended " + ends.missing


def test_the_usage_tap_of_a_messages_stream_counts_its_content_deltas_as_its_output_estimate():
    """A Messages stream cut short is charged the content deltas it relayed (about a token each), whatever the
    reads' sizes: not its message_start, block starts and stops, pings (before: every event, so a short answer's
    estimate ran several tokens high), nor a token that names the type in its text (its quotes escaped); another
    stream's tap counts its events."""
    import pytest

    from gomodel.proxy.exchange import MESSAGES_END, UsageTap
    from gomodel.proxy.sse import StreamIncomplete

    def event(kind, **data):
        return b"event: %s\ndata: %s\n\n" % (kind.encode(), json.dumps(dict(data, type=kind)).encode())

    def delta(text):
        return event("content_block_delta", index=0, delta={"type": "text_delta", "text": text})

    start = event("message_start", message={"id": "m", "usage": {"input_tokens": 9, "output_tokens": 1}})
    body = (start + event("ping") + event("content_block_start", index=0, content_block={"type": "text", "text": ""})
            + delta("hi") + delta('"content_block_delta"') + delta(" there") + event("content_block_stop", index=0))
    for size in (1, 7, 64, 4096):
        tap = UsageTap(stream=True, ends=MESSAGES_END)
        assert b"".join(tap.feed(body[at:at + size]) for at in range(0, len(body), size)) == body
        assert tap.events == 3, size
        with pytest.raises(StreamIncomplete):
            tap.finish()
        assert (tap.usage, tap.estimated) == ({"input_tokens": 9, "output_tokens": 3}, True)
    tap = UsageTap(stream=True)
    tap.feed(body)
    assert tap.events == 7


class _BodyTransport:
    """An upstream body's transport: it notes being stopped (the upstream connection closed)."""

    stopped = False

    def stopProducing(self):
        self.stopped = True


def test_a_stream_read_whole_is_cut_a_linger_after_its_own_end_and_not_at_a_word_in_a_token():
    """An event stream read to be gathered ends END_LINGER after its own end passed, where its upstream holds its
    body open (a Responses stream's last event, long, in many reads too); a token that says the end's word is none."""
    final = json.dumps({"type": "response.completed", "response": {"output": "x" * 100000}}).encode()
    for ends, stream, cut in (
            (RESPONSES_END, b"event: response.created\ndata: {}\n\nevent: response.completed\ndata: " + final + b"\n\n",
             True),
            (DONE_END, b'data: {"choices":[]}\n\ndata: [DONE]\n\n', True),
            (DONE_END, b'data: {"choices":[{"delta":{"content":"[DONE]"}}]}\n\n', False)):
        finished, clock = Deferred(), Clock()
        body = _GatheredBody(finished, 1 << 28, ends, clock)
        body.makeConnection(_BodyTransport())
        for at in range(0, len(stream), 7):
            body.dataReceived(stream[at:at + 7])
        clock.advance(END_LINGER)
        assert (finished.called, body.transport.stopped) == (cut, cut), stream[:40]
        if cut:
            assert finished.result == stream
        else:
            body.connectionLost(Failure(ResponseDone()))
            assert finished.result == stream and not clock.getDelayedCalls()
def test_usage_of_reads_cohere_billed_units_or_tokens_where_there_is_no_usage():
    body = (b'{"id":"e","embeddings":{"float":[[0.1]]},"meta":{"api_version":{"version":"2"},'
            b'"billed_units":{"input_tokens":7}}}')
    assert usage_of(body) == {"input_tokens": 7}
    assert usage_of(b'{"usage":{"prompt_tokens":3},"meta":{"billed_units":{"input_tokens":7}}}') == {"prompt_tokens": 3}
    assert usage_of(b'{"meta":{"billed_units":null}}') is None
    # vLLM's /v2/embed says them in meta.tokens alone; Cohere's API in both (billed_units is what it bills)
    vllm = b'{"id":"e","embeddings":{"float":[[0.1]]},"meta":{"api_version":{"version":"2"},"tokens":{"input_tokens":9}}}'
    assert usage_of(vllm) == {"input_tokens": 9}
    assert usage_of(b'{"meta":{"billed_units":{"input_tokens":7},"tokens":{"input_tokens":9}}}') == {"input_tokens": 7}
    # "tokens" that are no Cohere count: a token list (/tokenize's), an object without input_tokens
    assert usage_of(b'{"count":2,"tokens":[1,2]}') is None
    assert usage_of(b'{"data":{"tokens":{"a":1}}}') is None


def test_every_upstream_call_names_all_but_its_path_and_body():
    """L{upstream_call}'s parameters after C{body} are not keyword-only (for its cost, see its docstring), so the
    rule that callers name them is kept here: no call passes more than C{path} and C{body} by position."""
    root = pathlib.Path(gomodel.__file__).parent
    positional = []
    for source in root.rglob("*.py"):
        for node in ast.walk(ast.parse(source.read_text(), str(source))):
            if (isinstance(node, ast.Call) and getattr(node.func, "id", None) == "upstream_call"
                    and len(node.args) > 2):
                positional.append(f"{source.relative_to(root)}:{node.lineno}")
    assert positional == []
