"""The listening side checks the key when a request's head is in, before any body is stored (D1)."""

import json
import os
import re

import pytest
import pytest_twisted
from twisted.internet.defer import Deferred, succeed
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.task import deferLater

from tests.rawclient import HalfOpenClient, connect
from tests.support import start_gateway, until, with_timeout

BOUNDARY = b"gomodelboundary"


def upload_head(length, key=None, expect=False) -> bytes:
    lines = [b"POST /v1/files HTTP/1.1", b"Host: gateway",
             b"Content-Type: multipart/form-data; boundary=" + BOUNDARY, b"Content-Length: %d" % length]
    if key is not None:
        lines.append(b"Authorization: Bearer " + key)
    if expect:
        lines.append(b"Expect: 100-continue")
    return b"\r\n".join(lines) + b"\r\n\r\n"


def upload_body(size) -> bytes:
    return (b"--" + BOUNDARY + b'\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nbatch\r\n--' + BOUNDARY
            + b'\r\nContent-Disposition: form-data; name="file"; filename="big.jsonl"\r\n'
            + b"Content-Type: application/octet-stream\r\n\r\n" + b"x" * size + b"\r\n--" + BOUNDARY + b"--\r\n")


def spooled(gateway) -> list:
    found = []
    for root, _, files in os.walk(gateway.service.config.store.data_dir):
        found += [os.path.join(root, f) for f in files if not f.startswith("gomodel.db")]
    return found


@pytest_twisted.async_yield_fixture()
async def keyed(reactor, fake):
    gw = await start_gateway(reactor, {"VLLM_BASE_URL": fake.base_url, "GOMODEL_MASTER_KEY": "k1"})
    yield gw
    await gw.service.stopService()


@pytest_twisted.ensureDeferred
async def test_unauthenticated_upload_is_refused_without_spooling_a_byte(reactor, keyed):
    body = upload_body(3 * 1024 * 1024)
    client = await connect(reactor, keyed.port, upload_head(len(body)) + body[:len(body) // 2])
    # Half the body is in: nothing of it may be on disk.
    await deferLater(reactor, 0.2, lambda: None)
    assert spooled(keyed) == []
    client.transport.write(body[len(body) // 2:])
    await with_timeout(reactor, client.wait_for(b"invalid_api_key"), 10)
    await with_timeout(reactor, client.lost, 10)  # a refused request's connection is not kept
    received = bytes(client.received)
    assert received.startswith(b"HTTP/1.1 401 ")
    assert spooled(keyed) == []


@pytest_twisted.ensureDeferred
async def test_refused_request_is_not_invited_to_send_its_body_and_is_answered_before_it(reactor, keyed):
    """A client that waits for C{100 Continue} before its body gets the 401 without sending it (curl sends the
    body anyway after a second: before, the refusal waited for the whole body, every byte of it dropped), and
    the connection closes; the next connection is served as ever."""
    client = await connect(reactor, keyed.port, upload_head(50 * 1024 ** 2, key=b"wrong", expect=True))
    await with_timeout(reactor, client.lost, 10)  # not a byte of the body sent
    received = bytes(client.received)
    assert received.startswith(b"HTTP/1.1 401 ") and b"invalid_api_key" in received
    assert b"100 Continue" not in received and b"connection: close" in received.lower()
    assert spooled(keyed) == []
    answer = await _answer(reactor, keyed.port, b"GET /health HTTP/1.1\r\nHost: g\r\nConnection: close\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 200 ")


@pytest_twisted.ensureDeferred
async def test_a_refused_request_that_does_not_wait_for_100_continue_is_answered_after_its_body(reactor, keyed):
    """A client that sends its body without waiting (no Expect) is answered once the body is in, dropped: an
    answer before it, and the close after, would meet the body still arriving (a reset that can lose the
    answer)."""
    body = upload_body(1000)
    client = await connect(reactor, keyed.port, upload_head(len(body), key=b"wrong") + body[:500])
    await deferLater(reactor, 0.2, lambda: None)
    assert client.received == b""
    client.transport.write(body[500:])
    await with_timeout(reactor, client.lost, 10)
    assert bytes(client.received).startswith(b"HTTP/1.1 401 ")


@pytest_twisted.ensureDeferred
async def test_accepted_upload_is_still_invited_and_stored(reactor, keyed):
    body = upload_body(1000)
    client = await connect(reactor, keyed.port, upload_head(len(body), key=b"k1", expect=True))
    await with_timeout(reactor, client.wait_for(b"100 Continue"), 10)
    client.transport.write(body)
    await with_timeout(reactor, client.wait_for(b'"status":"processed"'), 10)
    assert bytes(client.received).split(b"\r\n\r\n", 1)[1].startswith(b"HTTP/1.1 200 ")
    client.transport.loseConnection()


async def _answer(reactor, port, request: bytes) -> bytes:
    client = await connect(reactor, port, request)
    await with_timeout(reactor, client.lost, 10)
    return bytes(client.received)


async def _managed_key(reactor, keyed) -> bytes:
    """A new managed key's secret, made with the master key (k1) over a raw connection."""
    body = b'{"name":"tenant"}'
    created = await _answer(reactor, keyed.port, b"POST /admin/api/v1/auth-keys HTTP/1.1\r\nHost: g\r\n"
                            b"Authorization: Bearer k1\r\nContent-Type: application/json\r\nConnection: close\r\n"
                            b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
    return re.search(rb'"value":"([^"]+)"', created).group(1)


@pytest_twisted.ensureDeferred
async def test_a_managed_key_is_refused_on_a_master_route_however_its_path_is_encoded(reactor, keyed):
    key = await _managed_key(reactor, keyed)
    for path in (b"/%61dmin/api/v1/auth-keys", b"/admin%2Fapi/v1/auth-keys", b"/%61dmin/api/v1/usage/log",
                 b"/%6Detrics"):
        answer = await _answer(reactor, keyed.port, b"GET %s HTTP/1.1\r\nHost: g\r\nAuthorization: Bearer %s\r\n"
                               b"Connection: close\r\n\r\n" % (path, key))
        assert answer.startswith(b"HTTP/1.1 403 ") and b'"master_key_required"' in answer, path
        assert b'"value"' not in answer
    # the master key's request on such a path is routed as the decoded path
    answer = await _answer(reactor, keyed.port, b"GET /%61dmin/api/v1/auth-keys HTTP/1.1\r\nHost: g\r\n"
                           b"Authorization: Bearer k1\r\nConnection: close\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 200 ") and b'"name":"tenant"' in answer


def chat_head(length) -> bytes:
    return (b"POST /v1/chat/completions HTTP/1.1\r\nHost: g\r\nAuthorization: Bearer k1\r\n"
            b"Content-Type: application/json\r\nExpect: 100-continue\r\nContent-Length: %d\r\n\r\n" % length)


@pytest_twisted.ensureDeferred
async def test_a_body_announced_past_the_limit_is_not_invited_and_is_answered_413(reactor, keyed):
    # A client waiting for 100 Continue gets the 413 at once, none of its 100 GiB sent, and the connection closes.
    answer = await _answer(reactor, keyed.port, chat_head(100 * 1024 ** 3))
    assert answer.startswith(b"HTTP/1.1 413 ") and b'"request_too_large"' in answer
    assert b"100 Continue" not in answer and b"connection: close" in answer.lower()
    # One that sends it without asking is answered at its first bytes, the close lingering (what comes is dropped).
    size = 11 * 1024 * 1024  # past the default limit of 10 MiB
    head = chat_head(size).replace(b"Expect: 100-continue\r\n", b"")
    answer = await _answer(reactor, keyed.port, head + b" " * size)
    assert answer.startswith(b"HTTP/1.1 413 ") and b'"request_too_large"' in answer
    assert b"connection: close" in answer.lower()


@pytest.mark.parametrize("path, dialect", [(b"/v1/chat/completions", b'"type":"invalid_request_error"'),
                                           (b"/v1/messages", b'"type":"error"')])
@pytest_twisted.ensureDeferred
async def test_a_chunked_body_past_the_limit_is_answered_413_at_once_and_the_connection_closes(
        reactor, keyed, fake, path, dialect):
    """A chunked body (no length to refuse at its head) that passes BODY_SIZE_LIMIT is answered 413 in its route's
    dialect as soon as it does, nothing sent upstream, with C{Connection: close}; the gateway then shuts its side
    and drops what still comes (before, it read the whole body, however long, then answered and kept the
    connection)."""
    head = (b"POST %s HTTP/1.1\r\nHost: g\r\nAuthorization: Bearer k1\r\nContent-Type: application/json\r\n"
            b"anthropic-version: 2023-06-01\r\nTransfer-Encoding: chunked\r\n\r\n" % path)
    chunk = b"%x\r\n%s\r\n" % (1 << 20, b" " * (1 << 20))
    sent = len(fake.forwarded())
    client = HalfOpenClient(head + chunk * 11)  # past the default 10 MiB, and the body does not end
    await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", keyed.port), client)
    await with_timeout(reactor, client.shut, 10)
    answer = bytes(client.received)
    assert answer.startswith(b"HTTP/1.1 413 ") and b'request_too_large' in answer and dialect in answer, answer
    assert b"connection: close" in answer.lower()
    client.transport.write(chunk)  # still read (and dropped) while its client sends
    client.transport.loseConnection()
    assert len(fake.forwarded()) == sent
    answer = await _answer(reactor, keyed.port, b"GET /health HTTP/1.1\r\nHost: g\r\nConnection: close\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 200 ")


@pytest_twisted.ensureDeferred
async def test_pipelined_answers_keep_their_order_and_a_bodiless_answer_its_head(reactor, keyed):
    # The channel holds an answer's head until its first body bytes; a HEAD answer has none, so its head
    # leaves when the request is done, before the next pipelined answer's.
    requests = (b"HEAD /health HTTP/1.1\r\nHost: gateway\r\n\r\n"
                b"GET /health HTTP/1.1\r\nHost: gateway\r\n\r\n"
                b"GET /v1/models HTTP/1.1\r\nHost: gateway\r\nConnection: close\r\n\r\n")
    client = await connect(reactor, keyed.port, requests)
    await with_timeout(reactor, client.lost, 10)
    received = bytes(client.received)
    statuses = re.findall(rb"HTTP/1\.1 (\d{3}) ", received)
    assert statuses == [b"200", b"200", b"401"]
    head_answer, rest = received.split(b"\r\n\r\n", 1)
    assert b"content-length" in head_answer.lower()
    assert rest.startswith(b"HTTP/1.1 200 ")  # nothing between the HEAD answer's head and the next answer


@pytest_twisted.ensureDeferred
async def test_idle_client_connections_are_closed_by_the_sweep_and_busy_ones_kept(reactor):
    from twisted.internet.task import Clock
    from twisted.web.resource import Resource
    from twisted.web.server import NOT_DONE_YET

    from gomodel.http.site import GatewaySite

    held = []

    class Root(Resource):
        isLeaf = True

        def render_GET(self, request):
            if request.path == b"/hold":
                held.append(request)
                return NOT_DONE_YET
            return b"ok"

    clock = Clock()
    site = GatewaySite(Root(), 1024, idle_timeout=120, reactor=clock)
    port = reactor.listenTCP(0, site, interface="127.0.0.1")
    try:
        idle = await connect(reactor, port.getHost().port, b"GET /quick HTTP/1.1\r\nHost: g\r\n\r\n")
        busy = await connect(reactor, port.getHost().port, b"GET /hold HTTP/1.1\r\nHost: g\r\n\r\n")
        await with_timeout(reactor, idle.wait_for(b"ok"), 5)
        while not held:
            await deferLater(reactor, 0, lambda: None)
        site.sweep_idle()  # both seen: the idle one counts as idle from now
        clock.advance(119)
        site.sweep_idle()
        assert not idle.lost.called  # 119 s idle: kept
        clock.advance(1)
        site.sweep_idle()
        await with_timeout(reactor, idle.lost, 5)  # 120 s: closed
        clock.advance(1000)
        site.sweep_idle()
        assert not busy.lost.called and len(site.channels) == 1  # a request in progress is never cut
        held[0].write(b"done")
        held[0].finish()
        await with_timeout(reactor, busy.wait_for(b"done"), 5)
        site.sweep_idle()  # done: idle from this sweep on
        clock.advance(120)
        site.sweep_idle()
        await with_timeout(reactor, busy.lost, 5)
        assert not site.channels
    finally:
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_a_client_still_reading_an_answer_written_whole_is_not_idle_and_one_that_stopped_is(reactor):
    """An answer written whole (a large non-streamed one) is done for the gateway long before a slow client has
    read it: before, the sweep counted its connection idle from then on and closed it 120 s later (aborted 15 s
    after), though the client was still reading, so a slow download of a large answer was cut short."""
    from twisted.internet.task import Clock
    from twisted.web.resource import Resource

    from gomodel.http.site import GatewaySite
    from tests.support import settled, write_buffer

    big = b"x" * (48 * 1024 * 1024)

    class Root(Resource):
        isLeaf = True

        def render_GET(self, request):
            return big

    clock = Clock()
    site = GatewaySite(Root(), 1024, idle_timeout=120, reactor=clock)
    port = reactor.listenTCP(0, site, interface="127.0.0.1")
    try:
        client = await connect(reactor, port.getHost().port, b"GET /big HTTP/1.1\r\nHost: g\r\n\r\n")
        await with_timeout(reactor, client.wait_for(b"xxx"), 5)
        client.transport.pauseProducing()
        [channel] = site.channels
        await settled(reactor, lambda: write_buffer(channel.transport))
        assert write_buffer(channel.transport) > 0 and not channel.requests  # done, much of it still to send
        site.sweep_idle()
        for _ in range(4):  # 4 minutes of a client reading a little between two sweeps
            before = len(client.received)
            client.transport.resumeProducing()
            await until(reactor, lambda: len(client.received) > before + 1024 * 1024, what="some reading")
            client.transport.pauseProducing()
            await deferLater(reactor, 0.05, lambda: None)
            clock.advance(60)
            site.sweep_idle()
            assert not client.lost.called and not channel.transport.disconnecting
        clock.advance(60)
        site.sweep_idle()  # (it read nothing since the sweep before: idle from here)
        clock.advance(120)
        site.sweep_idle()  # a client that reads nothing of it for 120 s is cut: asked to close, which it does not
        assert channel.transport.disconnecting and not client.lost.called  # (read), then aborted
        clock.advance(channel.abortTimeout)
        await until(reactor, lambda: not site.channels, what="the stalled connection's abort")
        client.transport.resumeProducing()
        await with_timeout(reactor, client.lost, 5)
        assert len(client.received) < len(big)
    finally:
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_a_head_that_trickles_in_is_answered_408_and_a_complete_one_never(reactor):
    from twisted.internet.task import Clock
    from twisted.web.resource import Resource
    from twisted.web.server import NOT_DONE_YET

    from gomodel.http.site import GatewaySite

    held = []

    class Root(Resource):
        isLeaf = True

        def render_GET(self, request):
            held.append(request)
            return NOT_DONE_YET

    clock = Clock()
    site = GatewaySite(Root(), 1024, idle_timeout=120, head_timeout=60, reactor=clock)
    port = reactor.listenTCP(0, site, interface="127.0.0.1")
    try:
        slow = await connect(reactor, port.getHost().port, b"GET /a HTTP/1.1\r\nHost: g\r\n")
        # the next request's head arrives (part of it) while the first answer is in progress: not counted
        busy = await connect(reactor, port.getHost().port, b"GET /b HTTP/1.1\r\nHost: g\r\n\r\nGET /c HTTP/1.1\r\n")
        while not held:
            await deferLater(reactor, 0, lambda: None)
        while len(site.channels) < 2:
            await deferLater(reactor, 0, lambda: None)
        site.sweep_idle()  # the slow head seen arriving
        for _ in range(11):  # a byte every 5 s keeps it from ever being idle
            clock.advance(5)
            slow.transport.write(b"X")
            await deferLater(reactor, 0.01, lambda: None)
            site.sweep_idle()
            assert not slow.lost.called
        clock.advance(5)
        site.sweep_idle()  # 60 s since the first sweep saw it
        await with_timeout(reactor, slow.lost, 5)
        answer = bytes(slow.received)
        assert answer.startswith(b"HTTP/1.1 408 ") and b'"request_timeout"' in answer
        assert not busy.lost.called  # its answer is in progress: its pipelined head waits, and is not timed
        held[0].finish()
        await deferLater(reactor, 0.05, lambda: None)
        site.sweep_idle()  # /c's head, open from now on with no answer in progress
        clock.advance(59)
        site.sweep_idle()
        assert not busy.lost.called
        clock.advance(1)
        site.sweep_idle()
        await with_timeout(reactor, busy.lost, 5)
        assert b"HTTP/1.1 408 " in bytes(busy.received)
    finally:
        await port.stopListening()


class _CountingSink:
    """An upload sink that counts what it is sent (as the files API's does: its position is its count)."""

    def __init__(self):
        self.count = 0

    def write(self, data):
        self.count += len(data)

    def tell(self):
        return self.count

    def seek(self, *args):
        return 0

    def close(self):
        pass


def _body_site(reactor, upload_sink=None, **settings):
    """A GatewaySite on 127.0.0.1:0 with the default head and body deadlines (or C{settings}'), its sweep's
    clock a Clock: POST /hold is held (appended to the list returned), /echo answers its body's size, /upload
    streams to a L{_CountingSink} (or where C{upload_sink} says) and answers its count, /refused is refused
    when its head is in (answered 401)."""
    from twisted.internet.task import Clock
    from twisted.web.resource import Resource
    from twisted.web.server import NOT_DONE_YET

    from gomodel.errors import AuthenticationFailed
    from gomodel.http.site import GatewaySite

    held = []

    class Root(Resource):
        isLeaf = True

        def render_POST(self, request):
            if request.refusal is not None:
                request.setResponseCode(401)
                return b"refused"
            if request.path == b"/hold":
                held.append(request)
                return NOT_DONE_YET
            size = request.content.tell() if request.streamed else len(request.content.read())
            return b"got %d" % size

    def authenticate(request, path):
        if path == b"/refused":
            raise AuthenticationFailed("no key")

    def counting_sink(request, method, path, length):
        return _CountingSink() if path == b"/upload" else None

    clock = Clock()
    site = GatewaySite(Root(), 1024 * 1024, authenticate=authenticate, upload_sink=upload_sink or counting_sink,
                       reactor=clock, **settings)
    port = reactor.listenTCP(0, site, interface="127.0.0.1")
    return site, port, clock, held


def _post_head(path, length) -> bytes:
    return b"POST %s HTTP/1.1\r\nHost: g\r\nContent-Length: %d\r\n\r\n" % (path, length)


def _channel_of(site, client):
    """The gateway's side of C{client}'s connection (None: gone)."""
    if client.lost.called:
        return None
    port = client.transport.getHost().port
    for channel in list(site.channels):
        if channel.getPeer().port == port:
            return channel
    return None


def _body_read(site, client):
    """The bytes of the body being read on C{client}'s connection so far (None: no body being read)."""
    channel = _channel_of(site, client)
    if channel is None:
        return None
    request = channel._receiving
    if request is None or channel._head_open:
        return None
    return request.content.tell() if request.streamed else request._received


@pytest_twisted.ensureDeferred
async def test_a_body_that_trickles_in_below_the_minimum_rate_is_answered_408_and_closed(reactor):
    from gomodel.http.site import BODY_MIN_RATE, BODY_TIMEOUT

    assert (BODY_TIMEOUT, BODY_MIN_RATE) == (60, 500)  # the numbers below
    site, port, clock, held = _body_site(reactor)
    try:
        # a head that takes 55 s of its 60: the body's time starts when its own does
        head = _post_head(b"/echo", 100000)
        client = await connect(reactor, port.getHost().port, head[:20])
        await until(reactor, lambda: site.channels, limit=5, what="the connection")
        site.sweep_idle()
        for at in range(21, 32):
            clock.advance(5)
            client.transport.write(head[at - 1:at])
            await deferLater(reactor, 0.01, lambda: None)
            site.sweep_idle()
        client.transport.write(head[31:] + b"x" * 100)
        await until(reactor, lambda: _body_read(site, client) == 100, limit=5, what="the body's start")
        site.sweep_idle()  # the body seen arriving: it may take 60 s, and 1 s more for every 500 bytes
        for second in range(5, 65, 5):  # 100 bytes every 5 s (20 bytes a second): never idle
            clock.advance(5)
            client.transport.write(b"x" * 100)
            await until(reactor, lambda: _body_read(site, client) == 100 + 20 * second, limit=5, what="the bytes")
            site.sweep_idle()
            assert not client.lost.called  # at 60 s, 1300 bytes in: its deadline is 62.6 s
        clock.advance(5)
        site.sweep_idle()
        await with_timeout(reactor, client.lost, 5)
        answer = bytes(client.received)
        assert answer.startswith(b"HTTP/1.1 408 ") and b"Connection: close" in answer
        error = json.loads(answer.split(b"\r\n\r\n", 1)[1])["error"]
        assert error["code"] == "request_timeout" and error["type"] == "invalid_request_error"
        assert "its body arrived too slowly" in error["message"]
        assert not held
        await until(reactor, lambda: not site.channels, limit=5, what="the connection's end")
    finally:
        await port.stopListening()


@pytest.mark.parametrize("path, answer", [(b"/echo", b"got 2"), (b"/refused", b"refused")])
@pytest_twisted.ensureDeferred
async def test_a_request_pipelined_behind_another_is_invited_to_send_its_body_when_its_turn_comes(
        reactor, path, answer):
    """A client that pipelines a request waiting for C{100 Continue} behind another gets it (or the refusal of
    its head) once the answer before it is done. Before, the channel, which reads heads ahead, invited only a
    request first in line: the client waited for an invitation that never came (curl for a second, others
    until their own timeout)."""
    site, port, clock, held = _body_site(reactor)
    try:
        client = await connect(reactor, port.getHost().port, _post_head(b"/hold", 0) + (
            b"POST %s HTTP/1.1\r\nHost: g\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\n" % path))
        await until(reactor, lambda: held, limit=5, what="the first request")
        assert client.received == b""  # (nothing may come before the first answer)
        held[0].write(b"first")
        held[0].finish()
        if path == b"/echo":
            await with_timeout(reactor, client.wait_for(b"HTTP/1.1 100 Continue\r\n\r\n"), 5)
            client.transport.write(b"{}")
        await with_timeout(reactor, client.wait_for(answer), 5)
        received = bytes(client.received)
        assert received.index(b"first") < received.index(answer)
        client.transport.loseConnection()
    finally:
        await port.stopListening()


@pytest.mark.parametrize("head, status", [
    (b"POST /refused HTTP/1.1\r\nHost: g\r\nExpect: 100-continue\r\nContent-Length: %d\r\n\r\n", b"401"),
    (b"POST /echo HTTP/1.1\r\nHost: g\r\nTransfer-Encoding: gzip, chunked\r\nX-Size: %d\r\n\r\n", b"501"),
    (b"POST /echo HTTP/1.1\r\nHost: g\r\nContent-Length: %d\r\nX-Big: " + b"b" * 20000 + b"\r\n\r\n", b"431")],
    ids=["refused_at_its_head", "transfer_coding_not_implemented", "head_too_large"])
@pytest_twisted.ensureDeferred
async def test_a_client_still_sending_the_body_of_a_request_answered_early_reads_the_answer_never_a_reset(
        reactor, head, status):
    """A request answered at its head (a refusal its client did not wait for, a head the gateway cannot take)
    closes its connection lingering, as nginx's does: the answer leaves, then the gateway's side is shut, and
    what the client still sends is read and dropped until it closes. Before, the gateway closed with the body
    unread: the kernel reset the connection, and a client that sends its body before it reads (http.client,
    curl) saw a reset (or a broken pipe), never the answer."""
    from tests.rawclient import send_then_read
    from tests.support import in_thread

    site, port, clock, held = _body_site(reactor)
    try:
        size = 32 * 1024 * 1024  # more than the kernel's buffers hold on either side
        answer = await with_timeout(reactor, in_thread(
            send_then_read, port.getHost().port, head % size + b"x" * size, 20), 30)
        assert answer.startswith(b"HTTP/1.1 " + status + b" ") and b"Connection: close" in answer
        await until(reactor, lambda: not site.channels, limit=5, what="the connection's end")
        assert not held
    finally:
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_an_upload_cut_for_its_slow_body_ends_when_its_408_is_sent_not_when_its_client_goes(reactor):
    """The request whose body was too slow ends (its upload's sink is let go, L{gomodel.api.files}) once its
    408 is written, while its connection lingers for what the client still sends."""
    from tests.rawclient import HalfOpenClient

    site, port, clock, held = _body_site(reactor)
    endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port)
    try:
        client = HalfOpenClient(_post_head(b"/upload", 1000000) + b"x" * 10)
        await connectProtocol(endpoint, client)
        await until(reactor, lambda: _body_read(site, client) == 10, limit=5, what="the body's start")
        channel = _channel_of(site, client)
        request = channel._receiving
        ended = []
        request.notifyFinish().addErrback(ended.append)
        site.sweep_idle()
        clock.advance(61)
        site.sweep_idle()
        await with_timeout(reactor, client.shut, 5)
        assert bytes(client.received).startswith(b"HTTP/1.1 408 ")
        assert channel in site.channels and channel.lingering_since is not None  # (its client did not close)
        assert ended and request._disconnected and not channel.requests
        client.transport.loseConnection()
        await until(reactor, lambda: not site.channels, limit=5, what="the connection's end")
    finally:
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_a_lingering_connection_s_time_starts_once_its_answer_has_left(reactor):
    """A connection closing lingering whose client still reads a large answer, slowly, is not cut while it does,
    however long it takes (its linger's time starts once the answer has left)."""
    from twisted.internet.task import Clock
    from twisted.web.resource import Resource

    from gomodel.http.site import LINGER_TIME, GatewaySite

    size = 64 * 1024 * 1024  # more than the kernel's buffers hold: most of it waits in the gateway's

    class Big(Resource):
        isLeaf = True

        def render_GET(self, request):
            request.setHeader(b"content-length", b"%d" % size)
            return b"x" * size

    clock = Clock()
    site = GatewaySite(Big(), 1024, reactor=clock)
    port = reactor.listenTCP(0, site, interface="127.0.0.1")
    try:
        # The request says it is the last, and another follows: the answer closes lingering.
        client = await connect(reactor, port.getHost().port, b"GET /big HTTP/1.1\r\nHost: g\r\nConnection: close"
                               b"\r\n\r\nGET /big HTTP/1.1\r\nHost: g\r\n\r\n")
        client.transport.pauseProducing()
        stop_at = [0]  # it stops reading once it has read this much
        read = client.dataReceived

        def read_some(data):
            read(data)
            if len(client.received) >= stop_at[0]:
                client.transport.pauseProducing()

        client.dataReceived = read_some
        await until(reactor, lambda: site.channels and next(iter(site.channels)).lingering_since is not None,
                    limit=5, what="the lingering close")
        for _ in range(2 * LINGER_TIME // 5):  # a minute of reading a mebibyte every five seconds
            site.sweep_idle()
            stop_at[0] = len(client.received) + 1024 * 1024
            client.transport.resumeProducing()
            await until(reactor, lambda: len(client.received) >= stop_at[0], limit=5, what="a mebibyte")
            clock.advance(5)
        assert site.channels and not client.lost.called
        stop_at[0] = 2 * size
        client.transport.resumeProducing()
        await with_timeout(reactor, client.lost, 10)
        head, body = bytes(client.received).split(b"\r\n\r\n", 1)
        assert head.startswith(b"HTTP/1.1 200 ") and len(body) == size
        await until(reactor, lambda: not site.channels, limit=5, what="the connection's end")
    finally:
        await port.stopListening()


@pytest.mark.parametrize("kind", ["unix", "ssl"])
@pytest_twisted.ensureDeferred
async def test_a_unix_or_tls_listener_closes_lingering_too(reactor, tmp_path, kind):
    """A UNIX socket's connection lingers as a TCP one does (before, the client saw a broken pipe); a TLS one
    sends its close alert and reads on (its socket's write side is not shut below TLS: the connection would fail,
    an error logged)."""
    from twisted.internet.endpoints import serverFromString

    from tests.rawclient import send_then_read
    from tests.support import in_thread
    from tests.test_tap import _self_signed

    site, port, clock, held = _body_site(reactor)
    if kind == "unix":
        address = str(tmp_path / "gateway.sock")
        listening = await serverFromString(reactor, f"unix:{address}").listen(site)
    else:
        listening = await serverFromString(
            reactor, f"ssl:0:interface=127.0.0.1:privateKey={_self_signed(tmp_path)}").listen(site)
        address = listening.getHost().port
    try:
        size = 32 * 1024 * 1024
        head = b"POST /refused HTTP/1.1\r\nHost: g\r\nExpect: 100-continue\r\nContent-Length: %d\r\n\r\n"
        answer = await with_timeout(reactor, in_thread(
            send_then_read, address, head % size + b"x" * size, 20, kind == "ssl"), 30)
        assert answer.startswith(b"HTTP/1.1 401 ") and b"Connection: close" in answer
        await until(reactor, lambda: not site.channels, limit=5, what="the connection's end")
    finally:
        await port.stopListening()
        await listening.stopListening()


@pytest_twisted.ensureDeferred
async def test_a_lingering_close_ends_after_linger_time_or_a_sweep_without_a_byte(reactor):
    """A lingering connection is not held for ever by its client: one that keeps sending is cut LINGER_TIME
    (30 s) after its answer, one that neither sends nor closes at the next sweep but one."""
    from gomodel.http.site import LINGER_TIME
    from tests.rawclient import HalfOpenClient

    assert LINGER_TIME == 30
    site, port, clock, held = _body_site(reactor)
    head = b"POST /refused HTTP/1.1\r\nHost: g\r\nExpect: 100-continue\r\nContent-Length: 1000000000\r\n\r\n"
    endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port)
    try:
        sending, silent = HalfOpenClient(head + b"x" * 1000), HalfOpenClient(head)
        for client in (sending, silent):
            await connectProtocol(endpoint, client)
            await with_timeout(reactor, client.shut, 5)  # the answer, then the gateway's side shut
            assert bytes(client.received).startswith(b"HTTP/1.1 401 ")
        channel, quiet = _channel_of(site, sending), _channel_of(site, silent)
        for second in range(0, LINGER_TIME, 5):
            site.sweep_idle()
            assert not sending.lost.called and channel.lingering_since is not None
            sending.transport.write(b"x" * 1000)
            await until(reactor, lambda: channel.active, limit=5, what="the bytes")
            clock.advance(5)
            if second == 5:
                # nothing from it in a sweep's interval (its client reads no more: only the gateway's side knows)
                await until(reactor, lambda: quiet not in site.channels, limit=5, what="the silent one's end")
        assert channel in site.channels
        site.sweep_idle()
        await until(reactor, lambda: not site.channels, limit=5, what="the sending one's end")
    finally:
        await port.stopListening()


@pytest.mark.parametrize("path", [b"/echo", b"/upload", b"/refused"])
@pytest_twisted.ensureDeferred
async def test_a_slow_body_above_the_minimum_rate_is_never_cut_and_gets_its_answer(reactor, path):
    site, port, clock, held = _body_site(reactor)
    step = 5000  # every 5 s: 1000 bytes a second, twice the minimum, for twice BODY_TIMEOUT
    try:
        client = await connect(reactor, port.getHost().port, _post_head(path, 25 * step) + b"x" * step)
        # beside it, the same body at 100 bytes every 5 s: cut at the sweeps that keep the other
        slow = await connect(reactor, port.getHost().port, _post_head(path, 25 * step) + b"x" * 100)
        await until(reactor, lambda: _body_read(site, client) == step and _body_read(site, slow) == 100, limit=5,
                    what="the bodies' start")
        site.sweep_idle()
        for n in range(2, 26):
            clock.advance(5)
            client.transport.write(b"x" * step)
            if not slow.lost.called:
                slow.transport.write(b"x" * 100)
            if n < 25:
                await until(reactor, lambda: _body_read(site, client) == n * step, limit=5, what="the bytes")
                await until(reactor, lambda: slow.lost.called or _body_read(site, slow) == n * 100, limit=5,
                            what="the slow bytes")
                site.sweep_idle()
                assert not client.lost.called
        expected = b"refused" if path == b"/refused" else b"got %d" % (25 * step)
        await with_timeout(reactor, client.wait_for(expected), 5)
        assert bytes(client.received).startswith(b"HTTP/1.1 401 " if path == b"/refused" else b"HTTP/1.1 200 ")
        assert slow.lost.called and bytes(slow.received).startswith(b"HTTP/1.1 408 ")
    finally:
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_a_request_read_whole_is_never_cut_and_a_body_held_behind_its_answer_is_timed_after_it(reactor):
    site, port, clock, held = _body_site(reactor)
    try:
        # /hold's body is complete and its answer held; the next request's body, half sent, waits behind it
        client = await connect(reactor, port.getHost().port,
                               _post_head(b"/hold", 4) + b"done" + _post_head(b"/echo", 20) + b"x" * 10)
        await until(reactor, lambda: held, limit=5, what="the held answer")
        site.sweep_idle()
        for _ in range(200):  # 1000 s of an answer in progress
            clock.advance(5)
            site.sweep_idle()
        assert not client.lost.called
        held[0].write(b"answered")
        held[0].finish()
        await with_timeout(reactor, client.wait_for(b"answered"), 5)
        await until(reactor, lambda: _body_read(site, client) == 10, limit=5, what="the next body read")
        site.sweep_idle()  # the next body, read from now on with no answer in progress: timed from here
        clock.advance(60)
        site.sweep_idle()
        assert not client.lost.called  # its deadline: 60 s and 10 / 500
        clock.advance(5)
        site.sweep_idle()
        await with_timeout(reactor, client.lost, 5)
        answers = re.findall(rb"HTTP/1\.1 (\d{3}) ", bytes(client.received))
        assert answers == [b"200", b"408"]
    finally:
        await port.stopListening()


class _LaggingDisk:
    """A blob store whose disk lags until the test lets it catch up (each write's Deferred is held until then)."""

    def __init__(self):
        self.held = []
        self.lagging = True

    def create(self):
        return self

    def write(self, data):
        if not self.lagging:
            return succeed(None)
        d = Deferred()
        self.held.append(d)
        return d

    def catch_up(self):
        self.lagging = False
        held, self.held = self.held, []
        for d in held:
            d.callback(None)

    def abort(self):
        return succeed(None)


@pytest_twisted.ensureDeferred
async def test_the_time_a_lagging_disk_pauses_an_upload_is_not_counted_against_its_body_deadline(reactor):
    from gomodel.api.files import FilesAPI

    disk = _LaggingDisk()
    rate = 100000  # bytes a second a body must average: 1 MiB in is 10.5 s of credit
    site, port, clock, held = _body_site(reactor, upload_sink=FilesAPI(None, disk, 64 * 1024 * 1024).upload_sink,
                                         body_min_rate=rate)
    body = upload_body(2 * 1024 * 1024)
    first = 1024 * 1024
    try:
        # two uploads send their first MiB at once; the disk lags, so the gateway pauses reading each of them
        honest = await connect(reactor, port.getHost().port, upload_head(len(body)) + body[:first])
        trickler = await connect(reactor, port.getHost().port, upload_head(len(body)) + body[:first])
        clients = (honest, trickler)
        # past WRITE_BOUND (256 kB) waiting for the disk, the gateway stops reading them
        await until(reactor, lambda: len(site.channels) == 2 and not set(reactor.getReaders()) & {
            channel.transport for channel in site.channels}, limit=5, what="the uploads paused")
        assert disk.held and all(_body_read(site, c) < first for c in clients)  # the rest waits in the sockets
        site.sweep_idle()  # their bodies seen arriving
        for _ in range(40):  # 200 s of a paused upload: not the client's time (60 s and 1 s per 100 kB otherwise)
            clock.advance(5)
            site.sweep_idle()
            assert all(_body_read(site, c) is not None for c in clients)
        await deferLater(reactor, 0.05, lambda: None)
        assert not honest.lost.called and not trickler.lost.called
        disk.catch_up()  # reading again: the rest of the first MiB comes in
        await until(reactor, lambda: all(_body_read(site, c) == first for c in clients), limit=5,
                    what="the first MiB read")
        honest.transport.write(body[first:])  # the honest client sends the rest at once
        await with_timeout(reactor, honest.wait_for(b"got %d" % len(body)), 5)
        assert bytes(honest.received).startswith(b"HTTP/1.1 200 ")
        # the trickler, timed again from the disk's catching up: 60 s and 1 s per 100 kB received
        for n in range(1, 15):
            clock.advance(5)
            trickler.transport.write(body[first + 100 * (n - 1):first + 100 * n])
            await until(reactor, lambda: _body_read(site, trickler) == first + 100 * n, limit=5, what="the bytes")
            site.sweep_idle()
            assert not trickler.lost.called  # at 70 s: 60 s and 10.5 s due
        clock.advance(5)
        site.sweep_idle()
        await with_timeout(reactor, trickler.lost, 5)
        assert bytes(trickler.received).startswith(b"HTTP/1.1 408 ")
        assert not held and not disk.held
    finally:
        await port.stopListening()


@pytest.mark.parametrize("path", [b"/echo", b"/upload"])
@pytest_twisted.ensureDeferred
async def test_a_chunked_body_s_framing_counts_towards_its_minimum_rate(reactor, path):
    site, port, clock, held = _body_site(reactor)
    head = b"POST %s HTTP/1.1\r\nHost: g\r\nTransfer-Encoding: chunked\r\n\r\n" % path
    # every 5 s, 500 chunks of a byte each: 3000 bytes sent, 600 a second, 500 of them the body's (100 a second)
    fast = b"1\r\nx\r\n" * 500
    slow = b"1\r\nx\r\n" * 100  # 120 bytes a second sent: cut
    try:
        client = await connect(reactor, port.getHost().port, head + fast)
        trickler = await connect(reactor, port.getHost().port, head + slow)
        await until(reactor, lambda: _body_read(site, client) == 500 and _body_read(site, trickler) == 100, limit=5,
                    what="the bodies' start")
        site.sweep_idle()
        for n in range(2, 26):  # 120 s
            clock.advance(5)
            client.transport.write(fast)
            if not trickler.lost.called:
                trickler.transport.write(slow)
            await until(reactor, lambda: client.lost.called or _body_read(site, client) == n * 500, limit=5,
                        what="the bytes")
            await until(reactor, lambda: trickler.lost.called or _body_read(site, trickler) in (n * 100, None),
                        limit=5, what="the slow bytes")
            assert not client.lost.called  # counted only the body's bytes, cut at 80 s
            site.sweep_idle()
        client.transport.write(b"0\r\n\r\n")
        await with_timeout(reactor, client.wait_for(b"got %d" % (25 * 500)), 5)
        assert bytes(client.received).startswith(b"HTTP/1.1 200 ")
        await with_timeout(reactor, trickler.lost, 5)
        assert bytes(trickler.received).startswith(b"HTTP/1.1 408 ")
    finally:
        await port.stopListening()


def test_answer_headers_put_and_request_header_are_Twisteds_and_cookies_are_parsed_when_asked_for():
    from twisted.web.http_headers import Headers
    from twisted.web.test.requesthelper import DummyChannel

    from gomodel.http.headers import AUTHORIZATION, CONTENT_LENGTH, X_REQUEST_ID, AnswerHeaders, request_header
    from gomodel.http.site import GatewayRequest

    ours, theirs = AnswerHeaders(), Headers()
    ours.put(X_REQUEST_ID, b"abc")
    ours.put(CONTENT_LENGTH, b"1")
    ours.put(CONTENT_LENGTH, b"12")  # replaces
    theirs.setRawHeaders(b"x-request-id", [b"abc"])
    theirs.setRawHeaders(b"content-length", [b"12"])
    assert sorted(ours.getAllRawHeaders()) == sorted(theirs.getAllRawHeaders())
    request = GatewayRequest(DummyChannel())
    request.requestHeaders.addRawHeader(b"X-REQUEST-ID", b"first")
    request.requestHeaders.addRawHeader(b"x-request-id", b"last")
    assert request_header(request, X_REQUEST_ID) == request.getHeader(b"x-request-id") == b"last"
    assert request_header(request, AUTHORIZATION) is None
    request.requestHeaders.setRawHeaders(b"cookie", [b"a=1; b=2"])
    request.parseCookies()  # what Twisted calls for every request: nothing yet
    assert request.received_cookies == {}
    assert request.getCookie(b"b") == b"2" and request.received_cookies == {b"a": b"1", b"b": b"2"}


def test_a_request_id_is_the_clients_when_sane_else_new_random_hex_also_in_a_forked_child():
    from twisted.web.test.requesthelper import DummyChannel

    from gomodel.http.site import GatewayRequest, request_id_for

    def request(given=None):
        r = GatewayRequest(DummyChannel())
        if given is not None:
            r.requestHeaders.setRawHeaders(b"x-request-id", given if isinstance(given, list) else [given])
        return r

    assert request_id_for(request(b"trace-1.2:3")) == b"trace-1.2:3"
    assert request_id_for(request([b"first", b"last"])) == b"last"  # (the last of two, as getHeader reads it)
    made = [request_id_for(request(given)) for given in (None, b"", b"no spaces allowed", b"x" * 129)]
    assert all(re.fullmatch(rb"[0-9a-f]{32}", made_id) for made_id in made)
    assert len(set(made)) == len(made)
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child's generator is seeded afresh: not the parent's next id
        os.write(write, request_id_for(request()))
        os._exit(0)
    os.close(write)
    child = os.read(read, 64)
    os.close(read)
    os.waitpid(pid, 0)
    assert re.fullmatch(rb"[0-9a-f]{32}", child) and child != request_id_for(request())


def _not_found(answer: bytes) -> bool:
    head, _, body = answer.partition(b"\r\n\r\n")
    return (head.startswith(b"HTTP/1.1 404 ") and b"\r\nlocation:" not in head.lower()
            and json.loads(body)["error"]["type"] == "invalid_request_error"
            and json.loads(body)["error"]["code"] == "not_found")


@pytest_twisted.ensureDeferred
async def test_a_doubled_slash_is_a_404_never_a_redirect_built_from_the_clients_host(reactor, keyed):
    for path in (b"/admin/api/v1/usage//log", b"/admin/api/v1/providers//status", b"/admin/api/v1/usage/log//",
                 b"/admin/api/v1/auth-keys//x", b"/admin/api/v1/budgets//x", b"/admin//api/v1/usage",
                 b"/v1/files//x", b"/v1/batches//x/cancel"):
        answer = await _answer(reactor, keyed.port, b"GET %s HTTP/1.1\r\nHost: evil.example\r\n"
                               b"Authorization: Bearer k1\r\nConnection: close\r\n\r\n" % path)
        assert _not_found(answer), (path, answer)
        assert b"evil.example" not in answer


@pytest_twisted.ensureDeferred
async def test_a_path_that_begins_with_two_slashes_is_a_404_however_it_is_encoded(reactor, keyed):
    # Klein joined the path's segments anew and lost one of two leading slashes: //admin/... (the key check
    # saw no /admin/ there) was routed as /admin/..., where a managed key read and made keys.
    key = await _managed_key(reactor, keyed)
    body = b'{"name":"tenant"}'
    for secret in (key, b"k1"):
        for method, path in ((b"GET", b"/%2Fadmin/api/v1/auth-keys"), (b"POST", b"/%2Fadmin/api/v1/auth-keys"),
                             (b"GET", b"/%2fadmin/api/v1/usage/summary"), (b"GET", b"//admin/api/v1/auth-keys"),
                             (b"GET", b"//admin/dashboard"), (b"GET", b"//v1/models"), (b"GET", b"/%2Fv1/models"),
                             (b"GET", b"//health")):
            answer = await _answer(reactor, keyed.port, b"%s %s HTTP/1.1\r\nHost: g\r\nAuthorization: Bearer %s\r\n"
                                   b"Content-Type: application/json\r\nContent-Length: %d\r\nConnection: close\r\n"
                                   b"\r\n%s" % (method, path, secret, len(body), body))
            assert _not_found(answer), (method, path, secret, answer)
    listed = await _answer(reactor, keyed.port, b"GET /admin/api/v1/auth-keys HTTP/1.1\r\nHost: g\r\n"
                           b"Authorization: Bearer k1\r\nConnection: close\r\n\r\n")
    assert listed.count(b'"object":"auth_key"') == 1  # none was made on the way


@pytest_twisted.ensureDeferred
async def test_an_id_with_a_control_character_is_an_unknown_route(reactor, keyed):
    """No id, name or path a route takes holds a control character (PostgreSQL's text cannot hold a NUL:
    its lookup failed as a 400 there, a 404 on SQLite): such a path is an unknown route (the PostgreSQL
    store: tests/test_store_postgresql.py)."""
    for method, path in ((b"GET", b"/v1/files/file-a%00"), (b"GET", b"/v1/files/file-a%00/content"),
                         (b"DELETE", b"/v1/files/file-a%00"), (b"GET", b"/v1/batches/batch_a%0A"),
                         (b"POST", b"/v1/batches/batch_a%00/cancel"), (b"GET", b"/v1/responses/resp_a%7F"),
                         (b"DELETE", b"/v1/responses/resp_a%1b"), (b"GET", b"/admin/api/v1/auth-keys/key_a%00"),
                         (b"GET", b"/p/vllm/tokenize%00")):
        answer = await _answer(reactor, keyed.port, b"%s %s HTTP/1.1\r\nHost: g\r\nAuthorization: Bearer k1\r\n"
                               b"Content-Length: 0\r\nConnection: close\r\n\r\n" % (method, path))
        assert _not_found(answer) and b"\\u0000" not in answer, (method, path, answer)


@pytest_twisted.ensureDeferred
async def test_the_health_checks_with_a_trailing_slash_are_open_and_answer_the_same(reactor, keyed):
    async def answer(head):
        received = await _answer(reactor, keyed.port, head + b" HTTP/1.1\r\nHost: g\r\nConnection: close\r\n\r\n")
        lines = received.split(b"\r\n")
        return [line for line in lines if not line.lower().startswith((b"date:", b"x-request-id:"))]

    for path in (b"/health", b"/health/ready"):
        for method in (b"GET", b"HEAD"):
            exact = await answer(b"%s %s" % (method, path))
            assert exact[0] == b"HTTP/1.1 200 OK"
            assert await answer(b"%s %s/" % (method, path)) == exact, (method, path)


@pytest_twisted.ensureDeferred
async def test_a_key_header_sent_twice_with_different_values_is_refused_in_the_routes_dialect(reactor, keyed,
                                                                                              gateway):
    async def answer(port, path, *lines):
        head, _, body = (await _answer(reactor, port, b"GET %s HTTP/1.1\r\nHost: g\r\n%s\r\nConnection: close\r\n\r\n"
                                       % (path, b"\r\n".join(lines)))).partition(b"\r\n\r\n")
        return int(head.split(b" ", 2)[1]), json.loads(body)

    twice = ((b"Authorization: Bearer k1", b"Authorization: Bearer other"),
             (b"Authorization: Bearer other", b"Authorization: Bearer k1"),
             (b"x-api-key: k1", b"X-Api-Key: other"), (b"x-api-key: other", b"x-api-key: k1"))
    for lines in twice:
        for port in (keyed.port, gateway.port):  # with a master key, and an open gateway
            status, error = await answer(port, b"/v1/models", *lines)
            assert status == 400 and error["error"]["type"] == "invalid_request_error", (lines, error)
            assert error["error"]["code"] == "duplicate_header"
        status, error = await answer(keyed.port, b"/v1/messages", *lines)
        assert status == 400 and error["type"] == "error"
        assert error["error"]["type"] == "invalid_request_error" and "more than once" in error["error"]["message"]
    # the same key twice is one key; a health check reads none
    for lines in ((b"Authorization: Bearer k1", b"Authorization: Bearer k1"), (b"x-api-key: k1", b"x-api-key: k1")):
        status, models = await answer(keyed.port, b"/v1/models", *lines)
        assert status == 200 and models["object"] == "list"
    status, _ = await answer(keyed.port, b"/health", *twice[0])
    assert status == 200


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # (Twisted's 404 resource for a child it has not)
def test_the_sites_resource_for_a_request_is_the_one_twisteds_site_finds():
    from twisted.web.resource import Resource
    from twisted.web.server import Site
    from twisted.web.test.requesthelper import DummyRequest

    from gomodel.http.site import GatewaySite

    leaf = Resource()
    leaf.isLeaf = True
    root = Resource()
    root.putChild(b"a", leaf)
    for top in (root, leaf):
        for path in ([b"a", b"b"], [b"a"], [b"x"], []):
            ours, theirs = DummyRequest(list(path)), DummyRequest(list(path))
            ours.prepath, theirs.prepath = [b"p"], [b"p"]
            found, expected = GatewaySite(top, 1024).getResourceFor(ours), Site(top).getResourceFor(theirs)
            assert found is expected or type(found) is type(expected) is not Resource  # (a 404's made anew)
            assert (ours.prepath, ours.postpath, ours.sitepath) == (theirs.prepath, theirs.postpath, theirs.sitepath)
            assert ours.sitepath is not ours.prepath and ours.site.resource is top


def test_a_request_finishes_as_twisteds_and_is_logged_by_a_site_that_logs():
    # GatewaySite's log does nothing (the request's context logs it): its requests finish without the call; a site
    # whose log does something gets it, as from Twisted's finish; either way the answer is the same and it is done.
    from twisted.internet.testing import StringTransport
    from twisted.web.resource import Resource
    from twisted.web.server import NOT_DONE_YET

    from gomodel.http.site import GatewaySite

    class Page(Resource):
        isLeaf = True

        def render_GET(self, request):
            request.setHeader(b"content-type", b"text/plain")
            if request.path == b"/whole":
                return b"ok"
            request.write(b"chunk")  # (no length: chunked, its end written by Twisted's finish)
            request.finish()
            return NOT_DONE_YET

    logged = []

    class LoggingSite(GatewaySite):
        def log(self, request):
            logged.append(request.path)

    answers = []
    for site_class in (GatewaySite, LoggingSite):
        site = site_class(Page(), 1024)
        assert site.requestFactory.site_logs is (site_class is LoggingSite)
        for path in (b"/whole", b"/chunked"):
            channel = site.buildProtocol(None)
            transport = StringTransport()
            channel.makeConnection(transport)
            channel.dataReceived(b"GET %s HTTP/1.1\r\nHost: x\r\n\r\n" % path)
            answer = transport.value()
            answers.append(re.sub(rb"Date: [^\r]*", b"Date: -", re.sub(rb"X-Request-Id: \w+", b"", answer)))
            assert answer.startswith(b"HTTP/1.1 200 OK") and channel.requests == []  # (done: the next may come)
            channel.connectionLost(None)
    assert logged == [b"/whole", b"/chunked"] and answers[:2] == answers[2:]
    assert answers[0].endswith(b"\r\n\r\nok") and answers[1].endswith(b"5\r\nchunk\r\n0\r\n\r\n")


def test_a_body_is_kept_in_memory_or_in_a_temporary_file_as_twisted_keeps_it():
    """gotLength makes a body's BytesIO itself below Twisted's limit (without its two frames): the same
    storage as twisted.web.http's for every announced length, a chunked body's (None) included."""
    import io

    from twisted.web import http
    from twisted.web.test.requesthelper import DummyChannel

    from gomodel.http import site

    for length in (0, 2, site.IN_MEMORY_BODY - 1, site.IN_MEMORY_BODY, site.IN_MEMORY_BODY + 1, None):
        request = site.GatewayRequest(DummyChannel())
        request.method, request.uri = b"POST", b"/v1/chat/completions"
        request.gotLength(length)
        theirs = http._getContentFile(length)
        assert type(request.content) is type(theirs)
        assert (type(theirs) is io.BytesIO) == (length is not None and length < site.IN_MEMORY_BODY)
        request.content.close()
        theirs.close()


@pytest.mark.parametrize("last", [False, True])
def test_a_chunked_answers_first_write_is_framed_as_twisteds_toChunk_frames_it(last):
    """The first write of a chunked answer (and, with C{last}, its end in the same write, as a short stream's
    whole body is written) goes out framed as Twisted's toChunk frames a chunk, its end as Twisted's finish writes
    it: each chunk's size in lower-case hex."""
    from twisted.internet.testing import StringTransport
    from twisted.web.http import toChunk
    from twisted.web.resource import Resource
    from twisted.web.server import NOT_DONE_YET

    from gomodel.http.site import GatewaySite

    first, second = b"x" * 26, b"more"

    class Page(Resource):
        isLeaf = True

        def render_GET(self, request):
            request.setHeader(b"content-type", b"text/event-stream")
            request.write(first, last)
            if not last:
                request.write(second)
            request.finish()
            return NOT_DONE_YET

    channel = GatewaySite(Page(), 1024).buildProtocol(None)
    transport = StringTransport()
    channel.makeConnection(transport)
    channel.dataReceived(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    head, _, body = transport.value().partition(b"\r\n\r\n")
    assert b"Transfer-Encoding: chunked" in head
    assert body == b"".join(toChunk(first) + (() if last else toChunk(second))) + b"0\r\n\r\n"
    channel.connectionLost(None)


@pytest.mark.parametrize("end", ["finish", "lost"])
def test_a_chunked_answers_write_after_its_end_is_twisteds_refused_or_dropped(end):
    """A chunked answer's later writes are framed without Twisted's checks while it goes on; once it is finished
    a write raises as Twisted's does, and once its connection is lost a write is dropped as Twisted drops it."""
    from twisted.internet.error import ConnectionLost
    from twisted.internet.testing import StringTransport
    from twisted.python.failure import Failure
    from twisted.web.resource import Resource
    from twisted.web.server import NOT_DONE_YET

    from gomodel.http.site import GatewaySite

    requests = []

    class Page(Resource):
        isLeaf = True

        def render_GET(self, request):
            request.setHeader(b"content-type", b"text/event-stream")
            request.write(b"one")
            requests.append(request)
            return NOT_DONE_YET

    channel = GatewaySite(Page(), 1024).buildProtocol(None)
    transport = StringTransport()
    channel.makeConnection(transport)
    channel.dataReceived(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    [request] = requests
    request.write(b"two")
    assert transport.value().endswith(b"3\r\none\r\n3\r\ntwo\r\n")
    if end == "finish":
        request.finish()
        sent = transport.value()
        assert sent.endswith(b"3\r\ntwo\r\n0\r\n\r\n")
        with pytest.raises(RuntimeError):
            request.write(b"three")
    else:
        request.connectionLost(Failure(ConnectionLost()))
        sent = transport.value()
        request.write(b"three")
    assert transport.value() == sent
    channel.connectionLost(None)


@pytest.mark.parametrize("how", ["encoder", "fake_head", "cookie", "etag", "last_modified", "finished", "lost"])
def test_a_first_write_with_anything_to_decide_is_twisteds(how):
    """An answer's first write goes out without Twisted's checks (L{GatewayRequest._plain_first}) only where there
    is nothing to decide: an encoder's answer is encoded, a faked HEAD's body is dropped, a cookie, an ETag and a
    Last-Modified go out with its head, a write after its finish raises and one after its connection is lost is
    dropped, each as Twisted's C{write} does."""
    from twisted.internet.testing import StringTransport
    from twisted.python.failure import Failure
    from twisted.internet.error import ConnectionLost
    from twisted.web.resource import EncodingResourceWrapper, Resource
    from twisted.web.error import UnsupportedMethod
    from twisted.web.server import NOT_DONE_YET, GzipEncoderFactory

    from gomodel.http.site import GatewaySite

    raised = []

    class Page(Resource):
        isLeaf = True

        def render(self, request):
            if request.method == b"HEAD":  # (Twisted then fakes it: renders a GET, its body dropped)
                raise UnsupportedMethod([b"GET"])
            return super().render(request)

        def render_GET(self, request):
            if how == "cookie":
                request.addCookie(b"a", b"b")
            elif how == "etag":
                request.setETag(b"tag")
            elif how == "last_modified":
                request.setLastModified(784111777)
            elif how == "finished":
                request.write(b"")
                request.finish()
            elif how == "lost":
                request.connectionLost(Failure(ConnectionLost()))
            try:
                request.write(b"body")
            except RuntimeError:
                raised.append(how)
            if how == "fake_head":
                return b""  # (Twisted's fake HEAD needs a body returned: it writes its head then)
            if how not in ("finished", "lost"):
                request.finish()
            return NOT_DONE_YET

    page = EncodingResourceWrapper(Page(), [GzipEncoderFactory()]) if how == "encoder" else Page()
    channel = GatewaySite(page, 1024).buildProtocol(None)
    transport = StringTransport()
    channel.makeConnection(transport)
    method = b"HEAD" if how == "fake_head" else b"GET"
    channel.dataReceived(method + b" / HTTP/1.1\r\nHost: x\r\nAccept-Encoding: gzip\r\n\r\n")
    head, _, body = transport.value().partition(b"\r\n\r\n")
    expected = {"encoder": b"Content-Encoding: gzip", "cookie": b"Set-Cookie: a=b", "etag": b"ETag: tag",
                "last_modified": b"Last-Modified: Sun, 06 Nov 1994 08:49:37 GMT"}.get(how)
    if expected is not None:
        assert expected in head
    if how in ("encoder", "fake_head", "finished", "lost"):
        assert b"body" not in body  # (encoded, dropped, or never written)
    if how == "fake_head":
        assert head.startswith(b"HTTP/1.1 200") and body == b""
    if how == "finished":
        assert raised == ["finished"] and body == b"0\r\n\r\n"
    if how == "lost":
        assert head == b""
    if how in ("cookie", "etag", "last_modified"):
        assert body == b"4\r\nbody\r\n0\r\n\r\n"
    channel.connectionLost(None)


@pytest.mark.parametrize("values", [{}, {b"X-One": [b"1"]}, {b"X-One": [b"1"], b"X-Two": [b"a", b"b"], b"X-Three": [b"c"]}])
@pytest.mark.parametrize("lines", [b"", b"X-Ratelimit-Limit: 5\r\n"])
def test_an_answers_head_is_written_as_twisted_writes_it(values, lines):
    """The channel's head (status line, each value of each header on its own line, an AnswerHeaders' own lines
    after them) is what Twisted's C{HTTPChannel.writeHeaders} writes, in one piece."""
    from twisted.internet.testing import StringTransport
    from twisted.web.http import HTTPChannel
    from twisted.web.resource import Resource

    from gomodel.http.headers import AnswerHeaders
    from gomodel.http.site import GatewaySite

    headers = AnswerHeaders()
    for name, each in values.items():
        headers.setRawHeaders(name, each)
    headers.lines = lines
    channel = GatewaySite(Resource(), 1024).buildProtocol(None)
    ours = StringTransport()
    channel.makeConnection(ours)
    channel.writeHeaders(b"HTTP/1.1", b"200", b"OK", headers)
    channel.write(b"")
    theirs = StringTransport()
    twisted = HTTPChannel()
    twisted.makeConnection(theirs)
    twisted.writeHeaders(b"HTTP/1.1", b"200", b"OK", [(n, v) for n, each in values.items() for v in each])
    expected = theirs.value()
    assert ours.value() == expected[:-2] + lines + b"\r\n"
    channel.connectionLost(None)
    twisted.connectionLost(None)
