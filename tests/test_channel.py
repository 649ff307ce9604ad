"""The client connection parses requests with llhttp and keeps Twisted's channel behaviour around it."""

import io
import json
import re

import pytest
import pytest_twisted
from twisted.internet.defer import Deferred
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from gomodel.errors import AuthenticationFailed
from gomodel.http import render
from gomodel.http.channel import PIPELINE_DEPTH
from gomodel.http.site import GatewaySite, IdentityPending
from tests.rawclient import connect
from tests.support import with_timeout


class Echo(Resource):
    """Answers each request with what the channel read of it, as JSON; C{/hold} waits for the test."""

    isLeaf = True

    def __init__(self):
        super().__init__()
        self.held = []
        self.holding = Deferred()

    def render(self, request):
        if request.path == b"/hold":
            self.held.append(request)
            self.holding.callback(request)
            return NOT_DONE_YET
        return json.dumps({
            "method": request.method.decode(), "uri": request.uri.decode(), "version": request.clientproto.decode(),
            "headers": [[name.decode(), [v.decode() for v in values]]
                        for name, values in request.requestHeaders.getAllRawHeaders()],
            "body": request.content.read().decode()}).encode()


@pytest.fixture
def echo(reactor):
    resource = Echo()
    port = reactor.listenTCP(0, GatewaySite(resource, 1024 * 1024, reactor=reactor), interface="127.0.0.1")
    resource.port = port.getHost().port
    yield resource
    port.stopListening()


def answers(received: bytes) -> list:
    """The status and JSON body of each answer in C{received}."""
    found = []
    while received:
        head, _, rest = received.partition(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1])
        length = int(re.search(rb"(?i)content-length: (\d+)", head).group(1))
        found.append((status, json.loads(rest[:length]) if length else None))
        received = rest[length:]
    return found


@pytest_twisted.ensureDeferred
async def test_a_request_is_read_as_twisted_read_it(reactor, echo):
    client = await connect(reactor, echo.port, b"POST /v1/x?a=1 HTTP/1.1\r\nHost: g\r\nX-Twice: one \r\n"
                                               b"x-twice:  two\r\ncontent-length: 5\r\n\r\nhel")
    client.transport.write(b"lo")
    await with_timeout(reactor, client.wait_for(b"hello"), 5)
    [(status, seen)] = answers(bytes(client.received))
    assert status == 200
    assert seen == {"method": "POST", "uri": "/v1/x?a=1", "version": "HTTP/1.1", "body": "hello", "headers": [
        ["Host", ["g"]], ["X-Twice", ["one", "two"]], ["Content-Length", ["5"]]]}
    # A chunked body, and a head that comes in pieces, on the same connection.
    client.transport.write(b"POST /c HTTP/1.1\r\nHost: g\r\nTransfer-Enc")
    client.transport.write(b"oding: chunked\r\n\r\n3\r\nabc\r\n")
    client.transport.write(b"2\r\nde\r\n0\r\n\r\n")
    await with_timeout(reactor, client.wait_for(b"abcde"), 5)
    assert answers(bytes(client.received))[1][1]["body"] == "abcde"
    client.transport.loseConnection()


@pytest.mark.parametrize("request_bytes", [
    b"GET / HTTP/1.1\nHost: g\n\n",  # bare LF
    b"GET / HTTP/1.1\r\nHost : g\r\n\r\n",  # whitespace before the colon
    b"POST / HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",  # smuggling's pair
    b"POST / HTTP/1.1\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd",
    b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",  # a bad chunk size
    b"GET / HTTP/2.0\r\n\r\n",
    b"GET / HTTP/1.1\r\nX-A: a\x00b\r\n\r\n",
    b"GET / HTTP/1.1\r\n\r\n",  # no Host (RFC 9112 3.2)
    b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
    b"GET / HTTP/1.0\r\nHost: a\r\nHost: b\r\n\r\n",
])
@pytest_twisted.ensureDeferred
async def test_a_request_that_is_not_valid_http_gets_400_in_openais_envelope_and_the_connection_closes(
        reactor, echo, request_bytes):
    client = await connect(reactor, echo.port, request_bytes)
    await with_timeout(reactor, client.lost, 5)
    head, _, body = bytes(client.received).partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400 Bad Request\r\n") and b"Connection: close" in head
    error = json.loads(body)["error"]
    assert error["code"] == "bad_request" and error["type"] == "invalid_request_error"
    assert error["message"].startswith("The request is not valid HTTP/1.1: ")


@pytest.mark.parametrize("request_bytes", [
    b"POST / HTTP/1.1\r\nHost: g\r\nTransfer-Encoding: gzip, chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
    b"FOOBAR / HTTP/1.1\r\nHost: g\r\n\r\n",  # a method no one knows (RFC 9110 15.6.2)
])
@pytest_twisted.ensureDeferred
async def test_what_the_gateway_does_not_implement_is_501_and_the_connection_closes(reactor, echo, request_bytes):
    client = await connect(reactor, echo.port, request_bytes)
    await with_timeout(reactor, client.lost, 5)
    head, _, body = bytes(client.received).partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 501 Not Implemented\r\n") and b"Connection: close" in head
    assert json.loads(body)["error"]["code"] == "not_implemented"


@pytest_twisted.ensureDeferred
async def test_an_absolute_form_target_is_read_as_its_path_and_its_authority_as_host(reactor, echo):
    client = await connect(reactor, echo.port, b"GET http://Other.Example:8080/v1/x?a=1 HTTP/1.1\r\nHost: g\r\n\r\n"
                                               b"GET HTTPS://h?b=2 HTTP/1.0\r\n\r\n")
    await with_timeout(reactor, client.lost, 5)
    (_, first), (_, second) = answers(bytes(client.received))
    assert first["uri"] == "/v1/x?a=1" and ["Host", ["Other.Example:8080"]] in first["headers"]
    assert second["uri"] == "/?b=2" and ["Host", ["h"]] in second["headers"]


@pytest_twisted.ensureDeferred
async def test_a_head_that_never_ends_is_refused_before_it_is_all_read(reactor, echo):
    client = await connect(reactor, echo.port, b"GET / HTTP/1.1\r\nX-Endless: ")
    for _ in range(40):  # 40 kB of one header, 1 kB a write: llhttp holds a header until its end
        if client.lost.called:
            break
        client.transport.write(b"x" * 1024)
        await with_timeout(reactor, _turn(reactor), 5)
    await with_timeout(reactor, client.lost, 5)
    head, _, body = bytes(client.received).partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 431 Request Header Fields Too Large\r\n")
    assert json.loads(body)["error"]["code"] == "headers_too_large"


@pytest.mark.parametrize("request_bytes, status, code", [
    (b"GET /" + b"a" * 17000 + b" HTTP/1.1\r\nHost: g\r\n\r\n", b"414 URI Too Long", "uri_too_long"),
    (b"GET / HTTP/1.1\r\nHost: g\r\nX-Big: " + b"b" * 17000 + b"\r\n\r\n", b"431 Request Header Fields Too Large",
     "headers_too_large"),
    (b"GET / HTTP/1.1\r\nHost: g\r\n" + b"X-A: 1\r\n" * 501 + b"\r\n", b"431 Request Header Fields Too Large",
     "headers_too_large"),
])
@pytest_twisted.ensureDeferred
async def test_a_target_or_headers_past_the_limits_get_414_or_431(reactor, echo, request_bytes, status, code):
    """A target longer than the gateway parses is a 414 (a MUST of RFC 9112 3), headers past 16 kB or 500 a 431
    (RFC 6585), each with its own code, so a client can tell what to shorten (before: a 400 bad_request)."""
    client = await connect(reactor, echo.port, request_bytes)
    await with_timeout(reactor, client.lost, 5)
    head, _, body = bytes(client.received).partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 " + status + b"\r\n") and b"Connection: close" in head
    error = json.loads(body)["error"]
    assert error["code"] == code and error["type"] == "invalid_request_error"


@pytest.mark.parametrize("endless", [
    b"0\r\n" + b"X-Trailer: " + b"v" * 1000 + b"\r\n",  # trailers without end
    b"0\r\nX-Trailer: " + b"v" * 1024,  # one trailer without end (llhttp holds it until its end)
    b"1;ext=" + b"e" * 1024,  # a chunk's extension without end
])
@pytest_twisted.ensureDeferred
async def test_a_chunked_bodys_framing_that_never_ends_is_refused_before_it_is_all_read(reactor, echo, endless):
    """Trailers, a chunk's size line and its extensions are held by llhttp (or kept) until their end: bytes that
    bring no body are bounded as a head is (before, a client sending trailers without end grew the gateway's memory
    with every one, refused request or not, until the body's deadline)."""
    client = await connect(reactor, echo.port, b"POST /t HTTP/1.1\r\nHost: g\r\nTransfer-Encoding: chunked\r\n\r\n"
                                               b"3\r\nabc\r\n")
    first, more = endless.split(b"\r\n", 1) if endless.startswith(b"0") else (endless, b"")
    client.transport.write(first + (b"\r\n" if more else b""))
    repeated = more or endless[-1024:]
    for _ in range(40):  # 40 kB: 1 kB a write
        if client.lost.called:
            break
        client.transport.write(repeated)
        await with_timeout(reactor, _turn(reactor), 5)
    await with_timeout(reactor, client.lost, 5)
    head, _, body = bytes(client.received).partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400 Bad Request\r\n"), head
    assert json.loads(body)["error"]["code"] == "bad_request"


@pytest_twisted.ensureDeferred
async def test_a_chunked_body_with_extensions_and_trailers_is_read_as_its_data(reactor, echo):
    client = await connect(reactor, echo.port, b"POST /t HTTP/1.1\r\nHost: g\r\nTransfer-Encoding: chunked\r\n\r\n"
                                               b"3;name=value\r\nabc\r\n2\r\nde\r\n0\r\nX-Checksum: 1\r\n"
                                               b"X-Other: 2\r\n\r\nGET /next HTTP/1.1\r\nHost: g\r\n\r\n")
    await with_timeout(reactor, client.wait_for(b'"/next"'), 5)
    (_, first), (_, second) = answers(bytes(client.received))
    assert first["body"] == "abcde" and "X-Checksum" not in json.dumps(first["headers"])  # (trailers: dropped)
    assert second["method"] == "GET"
    client.transport.loseConnection()


@pytest_twisted.ensureDeferred
async def test_the_asterisk_target_is_options_alone_and_anything_else_a_405_envelope(reactor, echo):
    """C{OPTIONS *} asks about the server (RFC 9110 9.3.7): 200, no body; any other method on it is a 405 in OpenAI's
    envelope, as on any route (before, an empty 405 body), and the connection is kept."""
    client = await connect(reactor, echo.port, b"OPTIONS * HTTP/1.1\r\nHost: g\r\n\r\n"
                                               b"GET * HTTP/1.1\r\nHost: g\r\n\r\n"
                                               b"GET /after HTTP/1.1\r\nHost: g\r\nConnection: close\r\n\r\n")
    await with_timeout(reactor, client.lost, 5)
    received = bytes(client.received)
    (options, _), (status, error), (_, after) = answers(received)
    assert options == 200 and after["uri"] == "/after"
    assert status == 405 and error["error"]["code"] == "method_not_allowed", error
    assert error["error"]["type"] == "invalid_request_error" and "OPTIONS" in error["error"]["message"]
    assert b"\r\nAllow: OPTIONS\r\n" in received


def _turn(reactor):
    d = Deferred()
    reactor.callLater(0.01, d.callback, None)
    return d


@pytest_twisted.ensureDeferred
async def test_pipelined_requests_are_answered_in_order_and_the_last_one_read_ahead_closes(reactor, echo):
    requests = b"".join(b"GET /%d HTTP/1.1\r\nHost: g\r\n\r\n" % i for i in range(PIPELINE_DEPTH + 4))
    client = await connect(reactor, echo.port, requests)
    await with_timeout(reactor, client.lost, 5)
    received = bytes(client.received)
    assert [seen["uri"] for _, seen in answers(received)] == ["/%d" % i for i in range(PIPELINE_DEPTH)]
    assert received.count(b"Connection: close") == 1  # the last answer's: the client sends the rest again


@pytest_twisted.ensureDeferred
async def test_what_comes_while_an_answer_is_in_progress_waits_for_it(reactor, echo):
    client = await connect(reactor, echo.port, b"GET /hold HTTP/1.1\r\nHost: g\r\n\r\n")
    held = await with_timeout(reactor, echo.holding, 5)
    client.transport.write(b"POST /next HTTP/1.1\r\nHost: g\r\nContent-Length: 4\r\n\r\nnext")
    await with_timeout(reactor, _turn(reactor), 5)
    assert client.received == b""  # held, not answered before the first
    held.write(b"first")
    held.finish()
    await with_timeout(reactor, client.wait_for(b'"body": "next"'), 5)
    assert bytes(client.received).index(b"first") < bytes(client.received).index(b"/next")
    client.transport.loseConnection()


@pytest.mark.parametrize("framing,body", [
    (b"Content-Length: 3", b"abc"),
    (b"Transfer-Encoding: chunked", b"3\r\nabc\r\n0\r\n\r\n"),
])
@pytest_twisted.ensureDeferred
async def test_a_request_asking_to_switch_protocols_is_answered_as_any_other_with_its_body(
        reactor, echo, framing, body):
    # curl --http2 on an http:// address asks for h2c this way; llhttp stops after such a head.
    client = await connect(reactor, echo.port, b"POST /up HTTP/1.1\r\nHost: g\r\nConnection: Upgrade, HTTP2-Settings\r\n"
                                               b"Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQAAP__\r\n" + framing
                                               + b"\r\n\r\n" + body + b"GET /after HTTP/1.1\r\nHost: g\r\n\r\n")
    await with_timeout(reactor, client.wait_for(b'"/after"'), 5)
    (status, up), (_, after) = answers(bytes(client.received))
    assert status == 200 and up["uri"] == "/up" and up["body"] == "abc" and after["method"] == "GET"
    client.transport.loseConnection()


@pytest_twisted.ensureDeferred
async def test_connect_is_answered_and_closes_the_connection(reactor, echo):
    client = await connect(reactor, echo.port, b"CONNECT upstream:443 HTTP/1.1\r\nHost: upstream:443\r\n\r\n"
                                               b"\x16\x03\x01 tunnel bytes")
    await with_timeout(reactor, client.lost, 5)
    [(status, seen)] = answers(bytes(client.received))
    assert seen["method"] == "CONNECT" and seen["body"] == ""
    # the answer says the connection closes (RFC 9112 9.6), as every other answer after which it closes does
    assert b"\r\nconnection: close\r\n" in bytes(client.received).lower()


@pytest_twisted.ensureDeferred
async def test_http_1_0_is_answered_and_its_connection_closed(reactor, echo):
    client = await connect(reactor, echo.port, b"GET /old HTTP/1.0\r\n\r\nGET /never HTTP/1.0\r\n\r\n")
    await with_timeout(reactor, client.lost, 5)
    received = bytes(client.received)
    assert received.startswith(b"HTTP/1.0 200 ") and b"/never" not in received


@pytest_twisted.ensureDeferred
async def test_a_client_that_expects_100_continue_is_invited_once_the_head_is_in(reactor, echo):
    client = await connect(reactor, echo.port, b"POST /e HTTP/1.1\r\nHost: g\r\nExpect: 100-continue\r\n"
                                               b"Content-Length: 2\r\n\r\n")
    await with_timeout(reactor, client.wait_for(b"HTTP/1.1 100 Continue\r\n\r\n"), 5)
    client.transport.write(b"ok")
    await with_timeout(reactor, client.wait_for(b'"body": "ok"'), 5)
    client.transport.loseConnection()


@pytest_twisted.ensureDeferred
async def test_an_empty_line_before_a_request_is_skipped_even_alone(reactor, echo):
    client = await connect(reactor, echo.port, b"\r\n")
    await with_timeout(reactor, _turn(reactor), 5)
    client.transport.write(b"GET /after-blank HTTP/1.1\r\nHost: g\r\n\r\n")
    await with_timeout(reactor, client.wait_for(b"/after-blank"), 5)
    assert bytes(client.received).startswith(b"HTTP/1.1 200 ")
    client.transport.loseConnection()


@pytest_twisted.ensureDeferred
async def test_a_requests_path_and_arguments_are_split_as_twisted_splits_them(reactor):
    class Args(Resource):
        isLeaf = True

        def render(self, request):
            return json.dumps({"path": request.path.decode(), "args": {
                k.decode(): [v.decode() for v in vs] for k, vs in request.args.items()}}).encode()

    port = reactor.listenTCP(0, GatewaySite(Args(), 1024, reactor=reactor), interface="127.0.0.1")
    try:
        client = await connect(reactor, port.getHost().port,
                               b"GET /v1/files?limit=2&after=a%20b&empty=&limit=3 HTTP/1.1\r\nHost: g\r\n\r\n"
                               b"GET /plain HTTP/1.1\r\nHost: g\r\nConnection: close\r\n\r\n")
        await with_timeout(reactor, client.lost, 5)
        (_, first), (_, second) = answers(bytes(client.received))
        assert first == {"path": "/v1/files", "args": {"limit": ["2", "3"], "after": ["a b"], "empty": [""]}}
        assert second == {"path": "/plain", "args": {}}
    finally:
        await port.stopListening()


class _Sink(io.BytesIO):
    """An upload's sink (L{GatewaySite}'s C{upload_sink}): it keeps what comes."""


class _Refusing(Resource):
    """Answers a request's C{refusal}, as the gateway's front does."""

    isLeaf = True

    def render(self, request):
        return render.render(request, request.refusal) if request.refusal is not None else b"{}"


@pytest_twisted.ensureDeferred
async def test_an_upload_refused_while_its_chunked_body_comes_is_answered_its_refusal(reactor):
    """A chunked upload whose key is refused once its body is coming (a key looked up in the store): the rest of
    its body is dropped as it comes, counted as body (not as framing), and the client gets the refusal, a 401
    (before, its data was counted as no body at all, and a chunk of more than 16 kB was a 400 'framing or
    trailers too large')."""
    asked = Deferred()  # fires with [the identity's Deferred] once the head is in

    def authenticate(request, path):
        identity = Deferred()
        reactor.callLater(0, asked.callback, [identity])  # (once the head's read is done: the body comes)
        raise IdentityPending(identity)

    site = GatewaySite(_Refusing(), 1024 * 1024, reactor=reactor, authenticate=authenticate,
                       upload_sink=lambda request, method, path, length: _Sink())
    port = reactor.listenTCP(0, site, interface="127.0.0.1")
    try:
        client = await connect(reactor, port.getHost().port, b"POST /up HTTP/1.1\r\nHost: g\r\n"
                                                             b"Transfer-Encoding: chunked\r\n\r\n"
                                                             b"8000\r\n" + b"a" * 1024)
        [identity] = await with_timeout(reactor, asked, 5)
        identity.errback(AuthenticationFailed("Invalid API key."))  # (decided while the body comes)
        for _ in range(31):  # the rest of its 32 kB chunk, 1 kB a write
            client.transport.write(b"a" * 1024)
            await with_timeout(reactor, _turn(reactor), 5)
        client.transport.write(b"\r\n0\r\n\r\n")
        await with_timeout(reactor, client.lost, 5)
        head, _, body = bytes(client.received).partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 401 "), head
        assert json.loads(body)["error"]["message"] == "Invalid API key."
    finally:
        await port.stopListening()
