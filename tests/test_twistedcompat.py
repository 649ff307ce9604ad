"""Each private Twisted name the gateway uses still exists and behaves as assumed.

A failure here means the installed Twisted changed something
L{gomodel._twistedcompat} relies on: fix that module, not the callers.
"""

import inspect

import pytest

import pytest_twisted
from twisted.internet import abstract, tcp
from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater
from twisted.web import _newclient, client, http, resource, server
from twisted.web.http_headers import Headers
from twisted.internet.protocol import Protocol
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure

from gomodel import _twistedcompat


def test_the_channel_state_the_gateways_channel_keeps_is_HTTPChannels():
    # gomodel.http.channel.GatewayChannel parses with llhttp and keeps Twisted's state for the rest.
    channel = http.HTTPChannel()
    channel.makeConnection(StringTransport())
    assert channel.requests == [] and channel._dataBuffer == [] and channel._handlingRequest is False
    assert channel._waitingForTransport is False and channel._optimisticEagerReadSize == 0x4000
    assert channel._networkProducer is not None and channel.maxHeaders == 500 and channel.totalHeadersSize == 16384
    channel._send100Continue()
    assert channel.transport.value() == b"HTTP/1.1 100 Continue\r\n\r\n"
    channel.connectionLost(None)


def test_pool_connection_factory_is_replaceable():
    pool = client.HTTPConnectionPool(None)
    assert pool._factory is client._HTTP11ClientFactory
    _twistedcompat.use_pool_factory(pool, _twistedcompat.QuietClientFactory)
    assert pool._factory is _twistedcompat.QuietClientFactory
    assert "_newConnection" in vars(client.HTTPConnectionPool)


def test_client_protocol_sends_a_prepared_request_and_reads_its_answer():
    protocol = _newclient.HTTP11ClientProtocol()
    transport = StringTransport()
    protocol.makeConnection(transport)
    head = b"POST /v1/x HTTP/1.1\r\nHost: h\r\nContent-Length: 2\r\n\r\n{}"
    answer = protocol.request(_twistedcompat.PreparedRequest(b"POST", head))
    assert transport.value() == head
    protocol.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    response = answer.result
    assert response.code == 200
    body = []
    response.deliverBody(type("P", (Protocol,), {"dataReceived": lambda self, d: body.append(d)})())
    assert body == [b"ok"]


def test_request_process_internals_exist():
    assert hasattr(resource, "_IEncodingResource")
    assert callable(getattr(server.Request, "_handleStar"))
    assert "_encoder" in inspect.getsource(server.Request)
    process = inspect.getsource(server.Request.process)
    for name in ("_handleStar", "_IEncodingResource", "getEncoder", "_encoder", "getResourceFor", "render"):
        assert name in process, name


def test_send_now_relies_on_the_tcp_transport_attributes():
    for name in ("doWrite", "connected", "disconnecting", "producerPaused"):
        assert hasattr(tcp.Connection, name) or hasattr(abstract.FileDescriptor, name), name
    held = abstract.FileDescriptor()
    assert held.dataBuffer == b"" and held._tempDataBuffer == []

    class Idle:
        connected, disconnecting, producerPaused = 1, False, False
        dataBuffer, _tempDataBuffer = b"", [b"held"]
        writes = 0

        def doWrite(self):
            self.writes += 1

    transport = Idle()
    _twistedcompat.send_now(transport)
    transport.producerPaused = True
    _twistedcompat.send_now(transport)
    _twistedcompat.send_now(object())  # no doWrite (TLS): left alone
    assert transport.writes == 1


def test_fire_unwatched_fires_a_fresh_deferred_as_succeed_makes_one_and_a_watched_one_as_callback_does():
    """A Deferred nothing watches yet is fired without its (empty) callback chain run, as Twisted's C{succeed} makes
    one; what is added or awaited later sees its result at once. One already watched, or fired, is C{callback}'s."""
    from twisted.internet.defer import AlreadyCalledError, ensureDeferred

    cancelled = []
    fresh = Deferred(cancelled.append)
    _twistedcompat.fire_unwatched(fresh, 5)
    assert fresh.called and fresh.result == 5 and fresh._canceller is None  # (callback's: no cycle through it)
    got = []
    fresh.addCallback(got.append)
    fresh.cancel()
    assert got == [5] and cancelled == []

    async def waits(d):
        return await d

    again = Deferred()
    _twistedcompat.fire_unwatched(again, None)
    awaited = []
    ensureDeferred(waits(again)).addCallback(awaited.append)
    assert awaited == [None]
    watched = Deferred()
    watched.addCallback(lambda result: result + 1).addCallback(got.append)
    _twistedcompat.fire_unwatched(watched, 1)
    assert got == [5, 2]
    with pytest.raises(AlreadyCalledError):
        _twistedcompat.fire_unwatched(fresh, 6)
    for name in ("_callbacks", "called", "_canceller", "debug"):  # (and result, once fired)
        assert hasattr(Deferred(), name), name


def test_the_reactor_notes_the_signal_that_stopped_it_where_twistd_reads_it():
    from twisted.application import app
    from twisted.internet import base

    assert "_exitSignal" in vars(base.ReactorBase)
    assert "reactor._exitSignal" in inspect.getsource(app.ApplicationRunner.startReactor)

    class Reactor:
        _exitSignal = 15

    reactor = Reactor()
    _twistedcompat.exit_cleanly(reactor)
    assert reactor._exitSignal is None


def test_the_observer_twistd_makes_of_its_logfile_option_writes_its_lines_there(tmp_path):
    import signal

    from twisted.logger import LogLevel

    rotate = signal.getsignal(signal.SIGUSR1)
    try:
        observer = _twistedcompat.twistd_log_observer({"logfile": str(tmp_path / "g.log"), "nodaemon": True})
    finally:
        signal.signal(signal.SIGUSR1, rotate)  # (twistd's rotates its log file on SIGUSR1)
    observer({"log_format": "a {what} line", "what": "warn", "log_level": LogLevel.warn, "log_time": 0.0,
              "log_namespace": "test"})
    assert "a warn line" in (tmp_path / "g.log").read_text()


def test_header_names_are_written_as_Headers_writes_them():
    from twisted.web.http_headers import Headers

    from gomodel._twistedcompat import header_name

    headers = Headers()
    headers.setRawHeaders("x-ratelimit-limit-requests", ["600"])
    headers.setRawHeaders("X-RateLimit-Reset-Tokens", ["6m0s"])
    assert sorted(name for name, _ in headers.getAllRawHeaders()) == sorted(
        [header_name("x-ratelimit-limit-requests"), header_name("X-RateLimit-Reset-Tokens")])


def _waited_scenarios():
    """Scenarios run on a Deferred class: each returns what it saw (callbacks' calls, the end state)."""
    from twisted.internet.defer import AlreadyCalledError, CancelledError
    from twisted.python.failure import Failure

    def state(d, seen):
        info = d._debugInfo
        failed = info.failResult.type.__name__ if info is not None and info.failResult is not None else None
        if info is not None:
            info.failResult = None  # (seen: no "Unhandled error" when it goes)
        result = getattr(d, "result", "-")
        shown = result.type.__name__ if isinstance(result, Failure) else result if not isinstance(result, Deferred) \
            else ("a Deferred", getattr(result, "result", "-"))
        return seen, d.called, shown, d.paused, failed, d._chainedTo is not None, d._canceller is None

    def waiter_of(seen, returns=None, raises=None, then=None):
        def waiter(result):
            seen.append(("waiter", result.type.__name__ if isinstance(result, Failure) else result))
            if then is not None:
                then()
            if raises is not None:
                raise raises
            return returns(result) if callable(returns) else returns
        return waiter

    def plain(cls):  # the gateway's case: one waiter returning None
        seen = []
        d = cls()
        d.addBoth(waiter_of(seen))
        d.callback(1)
        return state(d, seen)

    def returns_a_value(cls):
        seen = []
        d = cls()
        d.addBoth(waiter_of(seen, returns=5))
        d.callback(1)
        d.addCallback(lambda r: seen.append(("after", r)))
        return state(d, seen)

    def then_a_callback(cls):
        seen = []
        d = cls()
        d.addBoth(waiter_of(seen, returns=lambda r: r + 1)).addCallback(lambda r: seen.append(("after", r)) or r)
        d.callback(1)
        return state(d, seen)

    def fails(cls):
        seen = []
        d = cls()
        d.addBoth(waiter_of(seen))
        d.errback(ValueError("no"))
        return state(d, seen)

    def fails_and_is_passed_on(cls):
        seen = []
        d = cls()
        d.addBoth(waiter_of(seen, returns=lambda r: r))
        d.errback(ValueError("no"))
        return state(d, seen)

    def raises(cls):
        seen = []
        d = cls()
        d.addBoth(waiter_of(seen, raises=KeyError("k")))
        d.callback(1)
        return state(d, seen)

    def raises_then_handled(cls):
        seen = []
        d = cls()
        d.addBoth(waiter_of(seen, raises=KeyError("k")))
        d.callback(1)
        d.addErrback(lambda f: seen.append(("handled", f.type.__name__)))
        return state(d, seen)

    def chains_to_an_unfired_one(cls):
        seen = []
        other = Deferred()
        d = cls()
        d.addBoth(waiter_of(seen, returns=other))
        d.callback(1)
        before = state(d, list(seen))
        d.addCallback(lambda r: seen.append(("after", r)))
        other.callback(7)
        return before, state(d, seen)

    def chains_to_a_fired_one(cls):
        seen = []
        d = cls()
        d.addBoth(waiter_of(seen, returns=Deferred().callback(3) or None))
        d.callback(1)
        fired = Deferred()
        fired.callback(3)
        e = cls()
        e.addBoth(waiter_of(seen, returns=fired))
        e.callback(2)
        return state(d, seen), state(e, seen)

    def adds_while_it_runs(cls):
        seen = []
        d = cls()
        d.addBoth(waiter_of(seen, then=lambda: d.addCallback(lambda r: seen.append(("added", r)))))
        d.callback(1)
        return state(d, seen)

    def pauses_while_it_runs(cls):
        seen = []
        d = cls()
        d.addBoth(waiter_of(seen, returns=4, then=lambda: (d.pause(), d.addCallback(
            lambda r: seen.append(("added", r)) or r))))
        d.callback(1)
        before = state(d, list(seen))
        d.unpause()
        return before, state(d, seen)

    def paused_when_fired(cls):
        seen = []
        d = cls()
        d.addBoth(waiter_of(seen))
        d.pause()
        d.callback(1)
        before = state(d, list(seen))
        d.unpause()
        return before, state(d, seen)

    def other_callbacks_first(cls):
        seen = []
        d = cls()
        d.addCallback(lambda r: seen.append(("first", r)) or r * 10)
        d.addBoth(waiter_of(seen))
        d.callback(1)
        return state(d, seen)

    def with_arguments(cls):
        seen = []
        d = cls()
        d.addBoth(lambda r, extra: seen.append(("both", r, extra)), "x")
        d.callback(1)
        return state(d, seen)

    def two_waiters(cls):
        seen = []
        d = cls()
        d.addBoth(waiter_of(seen, returns=lambda r: r + 1))
        d.addBoth(waiter_of(seen, returns=lambda r: r + 1))
        d.callback(1)
        return state(d, seen)

    def fired_twice(cls):
        seen = []
        d = cls()
        d.addBoth(waiter_of(seen))
        d.callback(1)
        with pytest.raises(AlreadyCalledError):
            d.callback(2)
        return state(d, seen)

    def added_once_fired(cls):
        seen = []
        d = cls()
        d.callback(1)
        d.addBoth(waiter_of(seen, returns=2))
        return state(d, seen)

    def cancelled(cls):
        seen = []
        d = cls(lambda it: seen.append("canceller"))
        d.addBoth(waiter_of(seen))
        d.cancel()
        return state(d, seen)

    def cancelled_by_its_canceller(cls):
        seen = []
        d = cls(lambda it: it.errback(CancelledError("by it")))
        d.addBoth(waiter_of(seen))
        d.cancel()
        return state(d, seen)

    def a_failure_given_to_callback(cls):
        seen = []
        d = cls()
        d.addBoth(waiter_of(seen))
        d.callback(Failure(ValueError("given")))
        return state(d, seen)

    def awaited_by_a_coroutine(cls):
        from gomodel.http.handling import Handling

        seen = []
        d = cls()

        async def waits():
            got = await d
            seen.append(("resumed", got))
            return got * 2

        Handling(lambda outcome, arg: seen.append(("done", outcome, arg)), "arg").start(waits())
        d.callback(21)
        return state(d, seen)

    def awaited_and_cancelled(cls):
        from gomodel.http.handling import Handling

        seen = []
        d = cls()

        async def waits():
            try:
                await d
            except CancelledError:
                seen.append("cancelled")
                raise

        handling = Handling(lambda outcome, arg: seen.append(("done", outcome.type.__name__)), None)
        handling.start(waits())
        handling.cancel()
        return state(d, seen)

    return [plain, returns_a_value, then_a_callback, fails, fails_and_is_passed_on, raises, raises_then_handled,
            chains_to_an_unfired_one, chains_to_a_fired_one, adds_while_it_runs, pauses_while_it_runs,
            paused_when_fired, other_callbacks_first, with_arguments, two_waiters, fired_twice, added_once_fired,
            cancelled, cancelled_by_its_canceller, a_failure_given_to_callback, awaited_by_a_coroutine,
            awaited_and_cancelled]


@pytest.mark.parametrize("scenario", _waited_scenarios(), ids=lambda scenario: scenario.__name__)
def test_a_waited_deferred_does_what_twisteds_deferred_does(scenario):
    """WaitedDeferred calls the waiter a coroutine's runner adds itself: whatever the waiter does, and whatever else
    is done to the Deferred, what is seen is what a Deferred shows."""
    assert scenario(_twistedcompat.WaitedDeferred) == scenario(Deferred)


def test_a_waited_deferreds_lone_waiter_is_called_without_twisteds_callback_loop():
    d = _twistedcompat.WaitedDeferred()
    got = []
    assert d.addBoth(got.append) is d and d._callbacks == []
    d._runCallbacks = lambda: got.append("Twisted's loop")  # (an instance attribute: what callback would call)
    d.callback(5)
    assert got == [5] and d.called and d.result is None and not d._runningCallbacks
    assert _twistedcompat.WaitedDeferred in __import__("twisted.internet.defer").internet.defer._DEFERRED_SUBCLASSES


def test_plain_headers_are_what_getRawHeaders_reads():
    from twisted.web.http_headers import Headers

    from gomodel._twistedcompat import header_name, plain_headers

    headers = Headers({b"X-Session-Id": [b"abc"]})
    assert plain_headers(headers)[header_name("x-session-id")] == headers.getRawHeaders(b"x-session-id") == [b"abc"]
    # the dict itself, not a copy: what is put in it (AnswerHeaders.put, keep_headers) is the headers'
    plain_headers(headers)[header_name("x-request-id")] = [b"r1"]
    assert headers.getRawHeaders(b"x-request-id") == [b"r1"] and plain_headers(headers) is plain_headers(headers)


# -- prompt connections, on real loopback sockets --------------------------------------------------

class _Collect(Protocol):
    def __init__(self):
        self.received = bytearray()
        self.made = Deferred()

    def makeConnection(self, transport):
        _twistedcompat.prompt(transport)
        super().makeConnection(transport)

    def connectionMade(self):
        self.made.callback(self)

    def dataReceived(self, data):
        self.received += data


async def _pair(reactor):
    """A prompt server connection and the client's plain non-blocking socket: (protocol, socket, port)."""
    import socket

    from twisted.internet.protocol import Factory

    server = _Collect()
    port = reactor.listenTCP(0, Factory.forProtocol(lambda: server), interface="127.0.0.1")
    sock = socket.create_connection(("127.0.0.1", port.getHost().port))
    sock.setblocking(False)
    await server.made
    return server, sock, port


async def _turns(reactor, n=5):
    for _ in range(n):
        await deferLater(reactor, 0, lambda: None)


def _recv_all(sock):
    got = bytearray()
    while True:
        try:
            data = sock.recv(1 << 20)
        except BlockingIOError:
            return bytes(got)
        if not data:
            return bytes(got)
        got += data


async def _close(reactor, server, sock, port):
    sock.close()
    server.transport.abortConnection()
    await port.stopListening()
    await _turns(reactor, 2)


@pytest_twisted.ensureDeferred
async def test_a_prompt_connection_writes_at_once_without_registering_for_writing(reactor):
    server, sock, port = await _pair(reactor)
    transport = server.transport
    assert type(transport).__name__ == "_PromptServer" and isinstance(transport, tcp.Server)
    transport.write(b"head ")
    transport.writeSequence([b"and ", b"body"])
    # in the kernel already: no reactor turn between the write and the peer
    assert _recv_all(sock) == b"head and body"
    assert transport not in reactor.getWriters()
    assert not transport.dataBuffer and not transport._tempDataBuffer
    await _close(reactor, server, sock, port)


@pytest_twisted.ensureDeferred
async def test_a_prompt_connection_sends_without_waiting_for_the_peers_ack(reactor):
    """Nagle's algorithm is off on a prompt connection, either side (a gateway's client's, an upstream's): it writes
    what it has at once, a stream's event as it came, never held until the peer acknowledges what went before (a
    paced stream's first token after its head waited for the client's delayed ACK: about 40 ms on Linux)."""
    import socket

    from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
    from twisted.internet.protocol import Factory

    server, sock, port = await _pair(reactor)
    assert server.transport.socket.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
    await _close(reactor, server, sock, port)
    port = reactor.listenTCP(0, Factory.forProtocol(Protocol), interface="127.0.0.1")
    endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port)
    client = await connectProtocol(endpoint, _twistedcompat.PromptClientProtocol())
    assert client.transport.socket.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
    client.transport.loseConnection()
    await port.stopListening()
    await _turns(reactor, 2)


@pytest_twisted.ensureDeferred
async def test_a_prompt_connection_buffers_what_the_socket_does_not_take(reactor):
    import socket

    server, sock, port = await _pair(reactor)
    transport = server.transport
    transport.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    data = bytes(range(256)) * 400  # 100 kB: more than the socket takes at once
    transport.write(data)
    transport.write(b"|after")  # queued behind what is buffered, never before it
    assert transport._tempDataBuffer  # the rest waits for the reactor
    assert transport in reactor.getWriters()
    assert not transport._direct  # (while it holds some: every write is Twisted's, behind it)
    got = bytearray()
    for _ in range(2000):
        got += _recv_all(sock)
        if len(got) >= len(data) + 6:
            break
        await deferLater(reactor, 0.001, lambda: None)
    assert bytes(got) == data + b"|after"
    assert transport not in reactor.getWriters()  # drained: unregistered as Twisted does
    assert transport._direct  # (and written at once again)
    transport.write(b"again")
    assert _recv_all(sock) == b"again" and transport not in reactor.getWriters()
    await _close(reactor, server, sock, port)


@pytest_twisted.ensureDeferred
async def test_send_now_hands_over_what_a_prompt_connection_holds_and_skips_one_that_holds_nothing(reactor):
    server, sock, port = await _pair(reactor)
    transport = server.transport
    writes = []
    transport.doWrite = lambda: writes.append(1) or type(transport).doWrite(transport)
    transport.write(b"x" * (_twistedcompat.PROMPT_WRITE_LIMIT + 1))  # (past the limit: buffered, as Twisted does)
    assert transport._tempDataBuffer and not transport._direct
    _twistedcompat.send_now(transport)  # handed over now (as much as one doWrite sends), not on the reactor's turn
    assert writes == [1] and _recv_all(sock)
    await _turns(reactor)  # (the rest, by the reactor)
    assert not transport._tempDataBuffer and not transport.dataBuffer and transport._direct
    _twistedcompat.send_now(transport)  # holds nothing: nothing to do
    assert len(writes) == 2
    await _close(reactor, server, sock, port)


@pytest_twisted.ensureDeferred
async def test_unsent_is_what_a_transport_holds_not_yet_handed_to_the_kernel(reactor):
    import socket

    from twisted.protocols.tls import TLSMemoryBIOProtocol

    server, sock, port = await _pair(reactor)
    transport = server.transport
    transport.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    assert _twistedcompat.unsent(transport) == 0
    transport.write(b"x" * 100000)  # (more than the socket takes)
    transport.write(b"y" * 1000)
    held = _twistedcompat.unsent(transport)
    assert 0 < held <= 101000 and held == len(transport.dataBuffer) - transport.offset + transport._tempDataLen
    wrapper = TLSMemoryBIOProtocol.__new__(TLSMemoryBIOProtocol)
    wrapper.transport = transport  # (a TLS connection: its socket's transport tells)
    assert _twistedcompat.unsent(wrapper) == held
    assert _twistedcompat.unsent(object()) == 0 and _twistedcompat.unsent(None) == 0
    await _close(reactor, server, sock, port)


@pytest_twisted.ensureDeferred
async def test_a_prompt_connection_pauses_reading_only_when_data_comes_while_paused(reactor):
    server, sock, port = await _pair(reactor)
    transport = server.transport
    transport.pauseProducing()
    transport.resumeProducing()  # a pause resumed at once changes nothing
    assert transport in reactor.getReaders()
    transport.pauseProducing()
    sock.sendall(b"while paused")
    await _turns(reactor)
    assert server.received == b""  # not delivered while paused
    assert transport not in reactor.getReaders()  # reading stopped once data came
    transport.resumeProducing()
    assert transport in reactor.getReaders()
    await _turns(reactor)
    assert server.received == b"while paused"
    await _close(reactor, server, sock, port)


@pytest_twisted.ensureDeferred
async def test_a_prompt_connection_still_reading_resumes_without_the_reactor(reactor, monkeypatch):
    server, sock, port = await _pair(reactor)
    transport = server.transport
    added = []
    add_reader = reactor.addReader
    monkeypatch.setattr(reactor, "addReader", lambda reader: (added.append(reader), add_reader(reader))[1])
    transport.resumeProducing()  # (the server's channel resumes after every answer, paused or not)
    assert added == [] and transport in reactor.getReaders()
    transport.stopReading()  # (reading stopped without a pause: it is started again all the same)
    assert transport not in reactor.getReaders()
    transport.resumeProducing()
    assert added == [transport] and transport in reactor.getReaders()
    transport.resumeProducing()
    assert added == [transport]
    sock.sendall(b"after a stop")
    await _turns(reactor)
    assert server.received == b"after a stop"
    await _close(reactor, server, sock, port)


@pytest_twisted.ensureDeferred
async def test_nothing_written_after_an_abort_reaches_the_peer(reactor):
    server, sock, port = await _pair(reactor)
    server.transport.write(b"before")
    assert _recv_all(sock) == b"before"
    server.transport.abortConnection()
    server.transport.write(b"after")  # dropped with the buffer, as Twisted drops it
    await _turns(reactor)
    try:
        after = _recv_all(sock)
    except ConnectionResetError:  # the abort's RST
        after = b""
    assert after == b""
    await _close(reactor, server, sock, port)


def _twisteds_direct(transport) -> bool:
    """What a prompt connection's C{_direct} stands for, read from Twisted's own state."""
    return bool(transport.connected and not (transport.disconnecting or transport._aborting
                                             or transport._writeDisconnected or transport.TLS))


@pytest.mark.parametrize("how", ["loseConnection", "loseWriteConnection", "abortConnection", "connectionLost",
                                 "startTLS"])
@pytest_twisted.ensureDeferred
async def test_a_prompt_connection_writes_at_once_only_in_the_states_twisted_would_send_in(reactor, how):
    """A prompt connection keeps in one attribute (C{_direct}) whether a write may go to the socket at once; each
    of Twisted's steps that closes, aborts, half-closes, loses or secures the connection clears it: a write after
    any is Twisted's (buffered, or dropped), never sent past that state."""
    from twisted.internet import ssl
    from twisted.internet.error import ConnectionDone

    server, sock, port = await _pair(reactor)
    transport = server.transport
    assert transport._direct is True and _twisteds_direct(transport)
    assert set(_twistedcompat._Prompt.__dict__) >= {how}  # (each is one of _Prompt's, which clears it)
    if how == "connectionLost":
        transport.stopReading()
        transport.connectionLost(Failure(ConnectionDone()))
    elif how == "startTLS":
        transport.startTLS(ssl.CertificateOptions())
    else:
        getattr(transport, how)()
    assert transport._direct is False and transport._shut is True
    transport.write(b"after")
    assert b"after" not in _recv_all(sock)  # (a write straight to the socket would be there at once, on loopback)
    if how != "connectionLost":
        transport.abortConnection()
    sock.close()
    await port.stopListening()
    await _turns(reactor, 2)


def test_other_transports_are_left_as_they_are():
    transport = StringTransport()
    _twistedcompat.prompt(transport)
    assert type(transport) is StringTransport
    protocol = _twistedcompat.QuietClientFactory(None, None).buildProtocol(None)
    assert isinstance(protocol, _newclient.HTTP11ClientProtocol)
    protocol.makeConnection(transport)
    assert type(transport) is StringTransport


# -- the swept pool ----------------------------------------------------------------------------------

class _Cached:
    """A pooled connection as the pool sees one (its state as HTTP11ClientProtocol keeps it: C{_state}, read by its
    C{state} property)."""

    _state = "QUIESCENT"

    @property
    def state(self):
        return self._state

    def __init__(self):
        self.closed = False
        self.transport = self

    def loseConnection(self):
        self.closed = True

    def abort(self):
        self.closed = True
        from twisted.internet.defer import succeed

        return succeed(None)


def test_a_swept_pool_keeps_no_timer_and_closes_idle_connections_within_the_timeout():
    from twisted.internet.task import Clock

    for name in ("_putConnection", "_removeConnection", "getConnection", "closeCachedConnections"):
        assert name in vars(client.HTTPConnectionPool), name
    clock = Clock()
    pool = _twistedcompat.SweptPool(clock)
    pool.cachedConnectionTimeout, pool.retryAutomatically = 4, False  # as make_pool sets them
    old, new = _Cached(), _Cached()
    pool._putConnection("k", old)
    clock.advance(2)
    pool._putConnection("k", new)
    assert not clock.getDelayedCalls()  # no timer per connection
    clock.advance(1.4)
    pool.close_idle(0.5)  # idle 3.4 s and 1.4 s: kept
    assert not old.closed and not new.closed
    clock.advance(0.1)
    pool.close_idle(0.5)  # the older one is idle 3.5 s: a sweep 0.5 s later would be too late
    assert old.closed and not new.closed
    taken = pool.getConnection("k", None).result  # Twisted's own getConnection takes it back
    assert taken is new and pool._connections["k"] == [] and not pool._timeouts
    pool._putConnection("k", new)
    assert pool.cached("k") is new and pool.cached("k") is None  # as getConnection takes it, without a Deferred
    gone = _Cached()
    gone._state = "CONNECTION_LOST"
    pool._putConnection("k", new)
    pool._connections["k"].insert(0, gone)  # lost while cached: skipped, as getConnection skips it
    pool._timeouts[gone] = pool._timeouts[new]
    assert pool.cached("k") is new and not pool._timeouts
    pool._putConnection("k", new)
    pool.closeCachedConnections()
    assert new.closed and not pool._timeouts


def test_a_swept_pool_reads_a_connections_state_without_its_property():
    """SweptPool puts back and takes each upstream connection reading its C{_state}, which Twisted's C{state} property
    returns (a Python frame, and a read CPython 3.11 leaves unspecialized, twice a request)."""
    from twisted.internet.task import Clock

    assert _newclient.HTTP11ClientProtocol.state.fget(_Cached()) == "QUIESCENT"  # (Twisted's property: its _state)

    class Unread(_Cached):
        @property
        def state(self):
            raise AssertionError("read through the property")

    pool = _twistedcompat.SweptPool(Clock())
    connection = Unread()
    pool._putConnection("k", connection)
    assert pool.cached("k") is connection and pool.cached("k") is None


@pytest.mark.parametrize("kind", ["EndingRequest", "GatewayRequest"])
def test_a_request_starts_with_what_twisteds_request_starts_with(kind):
    """EndingRequest (and so GatewayRequest) sets in one __init__ what Twisted's server and HTTP requests
    set in theirs: the same attributes, with equal values, the answer's headers made by its
    answer_headers. A Twisted that sets another fails this test, not a request."""
    from twisted.web.test.requesthelper import DummyChannel

    from gomodel.http.headers import AnswerHeaders
    from gomodel.http.site import GatewayRequest

    cls = GatewayRequest if kind == "GatewayRequest" else _twistedcompat.EndingRequest
    channel = DummyChannel()
    ours, theirs = vars(cls(channel)), vars(server.Request(channel))
    assert sorted(ours) == sorted(theirs)
    assert ours["responseHeaders"].__class__ is (AnswerHeaders if cls is GatewayRequest else Headers)
    for name, value in theirs.items():
        if name not in ("requestHeaders", "responseHeaders"):
            assert ours[name] == value, name
    assert list(ours["requestHeaders"].getAllRawHeaders()) == list(ours["responseHeaders"].getAllRawHeaders()) == []
    assert vars(cls(channel, queued=True))["queued"] is True


def test_an_ending_request_ends_once_as_notifyFinish_fires():
    from twisted.internet.error import ConnectionLost
    from twisted.python.failure import Failure
    from twisted.web.test.requesthelper import DummyChannel

    for finished_first in (True, False):
        request = _twistedcompat.EndingRequest(DummyChannel())
        request.method, request.clientproto = b"GET", b"HTTP/1.1"
        seen, notified = [], []
        request.ending = seen.append
        request.notifyFinish().addBoth(notified.append)
        if finished_first:
            request.finish()
            assert seen == [None] and notified == [None]
        else:
            request.connectionLost(Failure(ConnectionLost()))
            assert seen[0].check(ConnectionLost) and notified[0].check(ConnectionLost)
        assert len(seen) == 1 and request.ending is None


def _answer(protocol_class, method, chunks, lose=False, late=False, refuse=False):
    """What a client protocol makes of an upstream's answer in C{chunks}: the response's fields, its body,
    how the body ended, whether the connection went back to its pool, whether it was closed. With
    C{late}, the body is asked for only once every chunk has arrived (the response buffers it); with
    C{refuse}, the pool's callback raises a RuntimeError when the connection comes back."""
    from twisted.internet.error import ConnectionDone
    from twisted.python.failure import Failure

    pooled = []

    def quiescent(protocol):
        pooled.append(protocol)
        if refuse:
            raise RuntimeError("the pool is gone")

    protocol = protocol_class(quiescent)
    transport = StringTransport()
    protocol.makeConnection(transport)
    answer = protocol.request(_twistedcompat.PreparedRequest(method, method + b" / HTTP/1.1\r\nHost: h\r\n\r\n"))
    seen, body, ended, responses = {}, [], [], []

    class Collect(Protocol):
        def dataReceived(self, data):
            body.append(data)

        def connectionLost(self, reason):
            ended.append(reason.type.__name__)

    def got(response):
        seen.update(code=response.code, phrase=response.phrase, version=response.version, length=response.length,
                    headers=sorted(response.headers.getAllRawHeaders()))
        responses.append(response)
        if not late:
            response.deliverBody(Collect())

    answer.addCallbacks(got, lambda failure: seen.update(failed=failure.type.__name__))
    for chunk in chunks:
        protocol.dataReceived(chunk)
    if lose:
        protocol.connectionLost(Failure(ConnectionDone()))
    if late:
        for response in responses:
            response.deliverBody(Collect())
    return seen, b"".join(body), ended, bool(pooled), transport.disconnecting


_ANSWERS = [
    (b"POST", [b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nX-Twice: a\r\nX-Twice: b \r\nContent-Len",
               b"gth: 12\r\n\r\n{\"ok\":", b" true}"], False),
    (b"POST", [b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\nX-T: 1\r\n\r\n"],
     False),
    (b"POST", [b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 201 Created\r\nContent-Length: 2\r\n\r\nok"], False),
    (b"DELETE", [b"HTTP/1.1 204 No Content\r\nX-A: 1\r\n\r\n"], False),
    (b"POST", [b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"], False),
    (b"POST", [b"HTTP/1.1 502 Bad Gateway\r\nConnection: close\r\nContent-Length: 3\r\n\r\nbad"], False),
    (b"POST", [b"HTTP/1.1 200 OK\r\nConnection: keep-alive, close\r\nContent-Length: 2\r\n\r\nok"], False),
    (b"POST", [b"HTTP/1.1 200 OK\r\nConnection: keep-alive\r\nContent-Length: 2\r\n\r\nok"], False),
    (b"POST", [b"HTTP/1.0 200 OK\r\n\r\nuntil the ", b"connection closes"], True),
    (b"POST", [b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort"], True),
    (b"POST", [b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhel"], True),
    (b"POST", [b"HTTP/1.1 200 O"], True),
    (b"POST", [], True),
    (b"HEAD", [b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n"], False),
]


@pytest.mark.parametrize("late", [False, True])
@pytest.mark.parametrize("method,chunks,lose", _ANSWERS)
def test_an_answer_parsed_by_llhttp_is_what_twisteds_parser_makes_of_it(method, chunks, lose, late):
    assert _answer(_twistedcompat.PromptClientProtocol, method, chunks, lose, late) == _answer(
        _newclient.HTTP11ClientProtocol, method, chunks, lose, late)


def test_a_pool_that_fails_to_take_a_connection_back_closes_it_as_with_twisteds_and_logs_why(logged_errors):
    """The pool's quiescent callback raising: the connection closes, the answer's body still ends whole,
    and the failure is logged, as Twisted's own finishing step does it."""
    chunks = [b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"]
    ours = _answer(_twistedcompat.PromptClientProtocol, b"POST", chunks, refuse=True)
    assert logged_errors.flush(RuntimeError) == 1
    theirs = _answer(_newclient.HTTP11ClientProtocol, b"POST", chunks, refuse=True)
    assert logged_errors.flush(RuntimeError) == 1
    assert ours == theirs
    _, body, ended, _, closed = ours
    assert (body, ended, closed) == (b"ok", ["ResponseDone"], True)


def test_a_malformed_answer_fails_and_closes_the_connection_as_with_twisteds_parser():
    for protocol_class in (_twistedcompat.PromptClientProtocol, _newclient.HTTP11ClientProtocol):
        seen, body, ended, pooled, closed = _answer(
            protocol_class, b"POST", [b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n"])
        assert (body, ended, pooled, closed) == (b"", ["ResponseFailed"], False, True)
    # An answer after the whole answer: llhttp's parser closes the connection (Twisted's drops the bytes).
    seen, body, ended, pooled, closed = _answer(_twistedcompat.PromptClientProtocol, b"POST", [
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokHTTP/1.1 200 OK\r\n\r\n"])
    assert body == b"ok" and ended == ["ResponseDone"] and closed


@pytest.mark.parametrize("chunks", [
    [b"HTTP/1.1 200 OK\r\nX-Endless: "] + [b"a" * 65536] * 17,  # a header without end (llhttp holds it)
    [b"HTTP/1.1 200 OK\r\n"] + [b"X-Many: " + b"a" * 1000 + b"\r\n"] * 1100,  # headers without end
    [b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n"]
    + [b"X-Trailer: " + b"a" * 1000 + b"\r\n"] * 1100,  # trailers without end
])
def test_an_answer_whose_head_or_trailers_never_end_fails_and_closes_past_a_mebibyte(chunks):
    """What an upstream sends that is no body (its head, its trailers) is bounded: past ANSWER_HEAD_LIMIT in a row,
    the answer fails and its connection closes (before, every byte was kept while it came: an upstream sending
    headers or trailers without end grew the gateway's memory, its answer never done). Twisted's parser bounds a
    line to 16 kB, not the lines' number."""
    assert sum(map(len, chunks)) > _twistedcompat.ANSWER_HEAD_LIMIT
    seen, body, ended, pooled, closed = _answer(_twistedcompat.PromptClientProtocol, b"POST", chunks)
    assert closed and not pooled
    assert seen.get("failed") == "ResponseFailed" or (body == b"ok" and ended == ["ResponseFailed"]), (seen, ended)


def test_the_llhttp_parser_reads_every_answer_but_a_heads():
    protocol = _twistedcompat.PromptClientProtocol()
    protocol.makeConnection(StringTransport())
    protocol.request(_twistedcompat.PreparedRequest(b"POST", b"POST / HTTP/1.1\r\n\r\n"))
    assert isinstance(protocol._parser, _twistedcompat.AnswerParser)
    protocol.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
    protocol.request(_twistedcompat.PreparedRequest(b"HEAD", b"HEAD / HTTP/1.1\r\n\r\n"))
    assert isinstance(protocol._parser, _newclient.HTTPClientParser)


def test_a_plainly_dispatching_epoll_reactor_hands_events_over_and_logs_what_a_connection_raises(logged_errors):
    import socket

    from twisted.internet.epollreactor import EPollReactor
    from twisted.internet.selectreactor import SelectReactor

    assert not _twistedcompat.dispatch_plainly(SelectReactor())
    reactor = EPollReactor()
    assert _twistedcompat.dispatch_plainly(reactor)
    ours, theirs = socket.socketpair()
    seen, lost = [], []

    class Reader:
        def fileno(self):
            return ours.fileno()

        def logPrefix(self):
            return "Reader"

        def doRead(self):
            data = ours.recv(100)
            seen.append(data)
            if data == b"boom":
                raise RuntimeError("boom")

        def connectionLost(self, reason):
            lost.append(reason.type)

    try:
        reader = Reader()
        reactor.addReader(reader)
        theirs.send(b"hello")
        reactor.doIteration(1)
        assert seen == [b"hello"]
        theirs.send(b"boom")
        reactor.doIteration(1)  # Twisted's _doReadOrWrite logs it and disconnects the reader
        assert seen == [b"hello", b"boom"] and lost == [RuntimeError]
        # Logged as Twisted's _doReadOrWrite logs it: a legacy event (its system "-" here, not "Reader").
        [event] = logged_errors
        assert event["failure"].check(RuntimeError) and event["log_system"] == "-"
        logged_errors.clear()
        assert reader not in reactor.getReaders()
    finally:
        ours.close()
        theirs.close()
        reactor._poller.close()


def test_a_plainly_dispatched_read_event_ends_a_connection_as_twisteds_dispatch_does(logged_errors):
    # A readable-only event is handled by _plain_poll itself: what doRead says (a reason to close, read as a
    # half-close where the descriptor takes one), a fileno of -1 and an error end the connection as Twisted's
    # _doReadOrWrite ends it; any other event (writable) still goes to _doReadOrWrite.
    import socket

    from twisted.internet import error
    from twisted.internet.epollreactor import EPollReactor
    from twisted.internet.interfaces import IHalfCloseableDescriptor
    from zope.interface import implementer

    def run(plainly):
        reactor = EPollReactor()
        if plainly:
            assert _twistedcompat.dispatch_plainly(reactor)
        pairs = [socket.socketpair() for _ in range(4)]
        seen = []

        class Reader:
            def __init__(self, name, sock, says=None, gone=False):
                self.name, self.sock, self.says, self.gone = name, sock, says, gone

            def fileno(self):
                return -1 if self.gone and self.sock.fileno() in reactor._selectables else self.sock.fileno()

            def logPrefix(self):
                return self.name

            def doRead(self):
                seen.append((self.name, "read", self.sock.recv(100)))
                if self.says == "raise":
                    raise RuntimeError("boom")
                return self.says

            def doWrite(self):
                seen.append((self.name, "write"))
                reactor.removeWriter(self)

            def connectionLost(self, reason):
                seen.append((self.name, "lost", reason.type))

        @implementer(IHalfCloseableDescriptor)
        class HalfCloser(Reader):
            def readConnectionLost(self, reason):
                seen.append((self.name, "read lost", reason.type))

            def writeConnectionLost(self, reason):
                pass

        readers = [HalfCloser("half", pairs[0][0], error.ConnectionDone()), Reader("done", pairs[1][0],
                   error.ConnectionDone()), Reader("raises", pairs[2][0], "raise"), Reader("gone", pairs[3][0],
                   gone=True)]
        try:
            for reader, (_, theirs) in zip(readers, pairs):
                reactor.addReader(reader)
                theirs.send(b"x")
            writer = Reader("writer", pairs[0][1])
            reactor.addWriter(writer)
            reactor.doIteration(1)
            errors = [event["failure"].type for event in logged_errors]
            logged_errors.clear()
            return sorted(seen, key=str), errors, sorted(r.name for r in reactor.getReaders() if r in readers)
        finally:
            for ours, theirs in pairs:
                ours.close()
                theirs.close()
            reactor._poller.close()

    ours, twisteds = run(True), run(False)
    assert ours == twisteds
    seen, errors, left = ours
    assert ("half", "read lost", error.ConnectionDone) in seen and ("done", "lost", error.ConnectionDone) in seen
    assert ("raises", "lost", RuntimeError) in seen and ("gone", "lost", error.ConnectionFdescWentAway) in seen
    assert ("writer", "write") in seen and errors == [RuntimeError] and left == []


def test_a_prepared_request_cancelled_before_its_answer_fails_as_twisteds_and_closes():
    from twisted.internet.defer import CancelledError

    for protocol_class in (_twistedcompat.PromptClientProtocol, _newclient.HTTP11ClientProtocol):
        protocol = protocol_class()
        transport = StringTransport()
        protocol.makeConnection(transport)
        answer = protocol.request(_twistedcompat.PreparedRequest(b"POST", b"POST / HTTP/1.1\r\n\r\n"))
        busy = protocol.request(_twistedcompat.PreparedRequest(b"POST", b"POST / HTTP/1.1\r\n\r\n"))
        assert busy.result.check(_newclient.RequestNotSent)
        busy.addErrback(lambda _: None)
        failures = []
        answer.addErrback(failures.append)
        answer.cancel()
        [failure] = failures
        assert failure.check(_newclient.ResponseNeverReceived)
        assert failure.value.reasons[0].check(CancelledError)
        assert transport.disconnecting or getattr(transport, "aborting", False) or transport.disconnected


def test_an_agents_request_is_answered_through_the_llhttp_parser_too():
    from twisted.web.http_headers import Headers

    protocol = _twistedcompat.PromptClientProtocol()
    transport = StringTransport()
    protocol.makeConnection(transport)
    request = _newclient.Request._construct(b"GET", b"/v1/models", Headers({b"host": [b"h"]}), None, persistent=True)
    answer = protocol.request(request)
    assert isinstance(protocol._parser, _twistedcompat.AnswerParser)
    assert transport.value().startswith(b"GET /v1/models HTTP/1.1\r\n")
    protocol.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}")
    body = []
    answer.result.deliverBody(type("P", (Protocol,), {"dataReceived": lambda self, d: body.append(d)})())
    assert answer.result.code == 200 and body == [b"{}"] and protocol.state == "QUIESCENT"


def test_an_answer_that_came_in_one_read_is_whole_when_its_deferred_fires():
    protocol = _twistedcompat.PromptClientProtocol()
    protocol.makeConnection(StringTransport())
    answer = protocol.request(_twistedcompat.PreparedRequest(b"POST", b"POST / HTTP/1.1\r\n\r\n"))
    protocol.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 7\r\n\r\n{\"a\":1}")
    response = answer.result
    assert protocol.state == "QUIESCENT"  # back to its pool before the answer's Deferred fired
    assert _twistedcompat.whole_body(response) == b'{"a":1}'
    assert _twistedcompat.whole_body(response) is None  # taken: as after deliverBody
    # A body that comes after its head is read as it comes.
    answer = protocol.request(_twistedcompat.PreparedRequest(b"POST", b"POST / HTTP/1.1\r\n\r\n"))
    protocol.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 7\r\n\r\n{\"a\"")
    response = answer.result
    assert _twistedcompat.whole_body(response) is None
    body = []
    response.deliverBody(type("P", (Protocol,), {"dataReceived": lambda self, d: body.append(d)})())
    protocol.dataReceived(b":2}")
    assert b"".join(body) == b'{"a":2}'
    # Twisted's parser's answers (a HEAD's) are read with deliverBody.
    answer = protocol.request(_twistedcompat.PreparedRequest(b"HEAD", b"HEAD / HTTP/1.1\r\n\r\n"))
    protocol.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 7\r\n\r\n")
    assert _twistedcompat.whole_body(answer.result) is None


def test_an_answer_parser_is_freed_without_the_garbage_collector():
    # httptools' parser holds the answer parser's bound methods: a connection keeps its parser from one answer to the
    # next, and lets it go when it is lost (a cycle per upstream connection would otherwise wait for the gc, memory
    # growing with the load); an answer lost before it came lets its parser go at once.
    import gc
    import weakref

    gc.disable()
    try:
        protocol = _twistedcompat.PromptClientProtocol()
        protocol.makeConnection(StringTransport())
        answer = protocol.request(_twistedcompat.PreparedRequest(b"POST", b"POST / HTTP/1.1\r\n\r\n"))
        parser = weakref.ref(protocol._parser)
        protocol.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        response = answer.result
        assert _twistedcompat.whole_body(response) == b"ok"
        del answer
        assert parser().request is None and parser().response is None  # an idle connection keeps neither
        protocol.connectionLost(Failure(ConnectionDone()))
        assert parser() is None
        protocol = _twistedcompat.PromptClientProtocol()
        protocol.makeConnection(StringTransport())
        answer = protocol.request(_twistedcompat.PreparedRequest(b"POST", b"POST / HTTP/1.1\r\n\r\n"))
        parser = weakref.ref(protocol._parser)
        answer.addErrback(lambda _: None)
        answer.cancel()  # lost before its answer
        del answer
        protocol.connectionLost(Failure(ConnectionDone()))  # (as the aborted connection's transport tells it)
        assert parser() is None
    finally:
        gc.enable()


def _answers(protocol_class, answers):
    """L{_answer}'s, for each of C{answers} (C{(method, chunks)}) in turn on one connection, each request sent once
    the answer before it was whole and its connection back in its pool."""
    pooled = []
    protocol = protocol_class(pooled.append)
    transport = StringTransport()
    protocol.makeConnection(transport)
    seen, parsers = [], []
    for method, chunks in answers:
        answer = protocol.request(_twistedcompat.PreparedRequest(method, method + b" / HTTP/1.1\r\nHost: h\r\n\r\n"))
        parsers.append(protocol._parser)
        got, body, ended = {}, [], []

        class Collect(Protocol):
            def dataReceived(self, data):
                body.append(data)

            def connectionLost(self, reason):
                ended.append(reason.type.__name__)

        def read(response, got=got):
            got.update(code=response.code, phrase=response.phrase, version=response.version,
                       length=response.length, headers=sorted(response.headers.getAllRawHeaders()))
            response.deliverBody(Collect())

        answer.addCallbacks(read, lambda failure, got=got: got.update(failed=failure.type.__name__))
        for chunk in chunks:
            protocol.dataReceived(chunk)
        seen.append((got, b"".join(body), ended, len(pooled), transport.disconnecting))
        if transport.disconnecting:
            break
    return seen, parsers


_KEPT = [
    (b"POST", [b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nX-First: 1\r\nContent-Length: 7\r\n\r\n",
               b"{\"a\":1}"]),
    (b"POST", [b"HTTP/1.1 201 Created\r\nTransfer-Encoding: chunked\r\nX-Second: 2\r\n\r\n5\r\nhel",
               b"lo\r\n0\r\nX-Trailer: t\r\n\r\n"]),
    (b"DELETE", [b"HTTP/1.1 204 No Content\r\nX-Third: 3\r\n\r\n"]),
    (b"POST", [b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"]),
    (b"HEAD", [b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\nX-Head: h\r\n\r\n"]),
    (b"POST", [b"HTTP/1.1 200 OK\r\nConnection: keep-alive\r\nX-Sixth: 6\r\nContent-Length: 2\r\n\r\n", b"ok"]),
    (b"POST", [b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 3\r\n\r\none"]),
    (b"POST", [b"HTTP/1.0 200 OK\r\nContent-Length: 3\r\n\r\ntwo"]),  # llhttp reads nothing after it
    (b"POST", [b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nthree"]),
    (b"POST", [b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: 10\r\n\r\nbroken", b" off"]),
    (b"POST", [b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 4\r\n\r\nlast"]),
]


def test_a_kept_connections_answers_are_each_what_twisteds_parser_makes_of_them():
    """A connection kept alive reads each answer with the parser that read the one before it (one per connection,
    not one per answer): every answer is still what Twisted's parser, made anew for each, makes of it (no header,
    length, chunked framing, status or version of the one before it left in the next)."""
    ours, parsers = _answers(_twistedcompat.PromptClientProtocol, _KEPT)
    theirs, _ = _answers(_newclient.HTTP11ClientProtocol, _KEPT)
    assert ours == theirs
    assert len(ours) == len(_KEPT) and ours[-1][-1]  # all read; the last closed the connection
    assert [got["code"] for got, *_ in ours] == [200, 201, 204, 200, 200, 200, 200, 200, 200, 500, 200]
    # One parser but for the HEAD's (Twisted's) and after each HTTP/1.0 answer (made anew: llhttp reads no answer
    # after one without keep-alive).
    assert len(set(map(id, parsers[:4] + parsers[5:7]))) == 1 and isinstance(parsers[4], _newclient.HTTPClientParser)
    assert len(set(map(id, parsers[6:9]))) == 3 and parsers[8] is parsers[9] is parsers[10]


def test_a_kept_connections_parser_reads_its_next_answer_only_once_the_last_read_is_parsed():
    """A request sent on the connection by whoever read the last answer's end (the body's protocol, called while
    llhttp still parses that read) has its answer read by a parser of its own: bytes the upstream sent after its
    whole answer, in that read, still close the connection rather than answer the new request."""
    pooled = []
    protocol = _twistedcompat.PromptClientProtocol(pooled.append)
    transport = StringTransport()
    protocol.makeConnection(transport)
    answer = protocol.request(_twistedcompat.PreparedRequest(b"POST", b"POST / HTTP/1.1\r\n\r\n"))
    first = protocol._parser
    later = []

    class Again(Protocol):
        def connectionLost(self, reason):
            later.append(protocol.request(_twistedcompat.PreparedRequest(b"POST", b"POST / HTTP/1.1\r\n\r\n")))
            later.append(protocol._parser)

    protocol.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n")
    answer.result.deliverBody(Again())
    protocol.dataReceived(b"okHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nno")
    again, parser = later
    assert parser is not first and transport.disconnecting
    failures = []
    again.addErrback(failures.append)
    protocol.connectionLost(Failure(ConnectionDone()))
    assert failures and failures[0].check(_newclient.ResponseFailed, _newclient.ResponseNeverReceived)



def test_the_header_name_cache_keep_headers_reads_is_the_one_twisteds_encoder_fills():
    from twisted.web.http_headers import Headers

    Headers().addRawHeader(b"x-gomodel-cache-probe", b"1")
    assert _twistedcompat._CANONICAL_NAMES[b"x-gomodel-cache-probe"] == b"X-Gomodel-Cache-Probe"
    headers = {}
    _twistedcompat.keep_headers(headers, [b"x-gomodel-cache-probe", b"a ", b"x-Unseen-Name", b"b",
                                          b"X-GOMODEL-cache-probe", b"c"])
    assert headers == {b"X-Gomodel-Cache-Probe": [b"a", b"c"], b"X-Unseen-Name": [b"b"]}


def test_a_unix_endpoints_path_is_where_strports_keeps_it():
    from twisted.internet.endpoints import serverFromString

    assert _twistedcompat.unix_socket_path(serverFromString(None, "unix:/run/gomodel.sock:mode=660")) == "/run/gomodel.sock"
    assert _twistedcompat.unix_socket_path(serverFromString(None, "tcp:8080")) is None


def test_the_read_steps_a_prompt_connection_and_the_plain_poll_take_in_one_frame_are_twisteds():
    # _Prompt.doRead is tcp.Connection's doRead and _dataReceived in one frame, and _plain_poll takes
    # _doReadOrWrite's steps for an event that is only a read: a Twisted that changed them fails here.
    from twisted.internet import posixbase

    assert tcp.Server.doRead is tcp.Client.doRead is tcp.Connection.doRead
    read = inspect.getsource(tcp.Connection.doRead)
    assert "self.socket.recv(self.bufferSize)" in read and "return self._dataReceived(data)" in read
    assert "EWOULDBLOCK" in read and "return main.CONNECTION_LOST" in read
    received = inspect.getsource(tcp.Connection._dataReceived)
    assert "return main.CONNECTION_DONE" in received and "self.protocol.dataReceived(data)" in received
    steps = inspect.getsource(posixbase._PollLikeMixin._doReadOrWrite)
    for step in ("if selectable.fileno() == -1:", "why = _NO_FILEDESC", "why = selectable.doRead()",
                 "inRead = True", "why = sys.exc_info()[1]", "log.err()",
                 "self._disconnectSelectable(selectable, why, inRead)"):
        assert step in steps, step


def test_a_plainly_dispatching_epoll_reactor_disconnects_a_reader_as_twisteds_does(logged_errors):
    import socket

    from twisted.internet.epollreactor import EPollReactor
    from twisted.internet.error import ConnectionDone
    from twisted.internet.main import CONNECTION_DONE

    reactor = EPollReactor()
    assert _twistedcompat.dispatch_plainly(reactor)
    ours, theirs = socket.socketpair()
    lost = []

    class Reader:
        number = ours.fileno()

        def fileno(self):
            return self.number

        def logPrefix(self):
            return "Reader"

        def doRead(self):
            return CONNECTION_DONE if ours.recv(100) == b"done" else None

        def connectionLost(self, reason):
            lost.append(reason.type)

    try:
        reader = Reader()
        reactor.addReader(reader)
        theirs.send(b"done")
        reactor.doIteration(1)  # what doRead returns ends the reader
        assert lost == [ConnectionDone] and reader not in reactor.getReaders()
        reader = Reader()
        reactor.addReader(reader)
        reader.number = -1  # (a closed one's, as Twisted's FileDescriptor says it)
        theirs.send(b"more")
        reactor.doIteration(1)
        assert len(lost) == 2 and reader not in reactor.getReaders()
    finally:
        ours.close()
        theirs.close()
        reactor._poller.close()
    assert not logged_errors


@pytest_twisted.ensureDeferred
async def test_a_client_connection_hands_its_reads_to_the_http_protocol_itself(reactor):
    from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
    from twisted.internet.interfaces import IHalfCloseableProtocol
    from twisted.internet.protocol import Factory
    from zope.interface import implementer

    port = reactor.listenTCP(0, Factory.forProtocol(Protocol), interface="127.0.0.1")
    endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port)
    protocol = await connectProtocol(endpoint, _twistedcompat.PromptClientProtocol())
    # No endpoint wrapper between the connection and the protocol: one call less on every read.
    assert protocol.transport.protocol is protocol

    @implementer(IHalfCloseableProtocol)
    class HalfCloseable(Protocol):
        def makeConnection(self, transport):
            _twistedcompat.unwrap(transport, self)
            super().makeConnection(transport)

        def readConnectionLost(self):
            pass

        def writeConnectionLost(self):
            pass

    other = await connectProtocol(endpoint, HalfCloseable())
    assert other.transport.protocol is not other  # (its wrapper gives it more than its events)
    protocol.transport.loseConnection()
    other.transport.loseConnection()
    await port.stopListening()
    await _turns(reactor, 2)


def test_a_transport_proxy_stops_as_stopProxying_stops_it_once_its_producer_is_dropped():
    """L{PromptClientProtocol._finish_whole} stops the answer's transport proxy by dropping its C{_producer}, as
    C{stopProxying} does."""
    transport = StringTransport()
    proxy = _newclient.TransportProxyProducer(transport)
    proxy.stopProxying()
    assert proxy._producer is None
    proxy = _newclient.TransportProxyProducer(transport)
    proxy._producer = None
    proxy.pauseProducing()
    proxy.stopProducing()
    assert transport.producerState == "producing"


def test_an_answers_response_and_headers_are_what_twisteds_constructors_make():
    """The answer parser makes an answer's L{Response} and L{Headers} without their constructors (two Python
    frames, and Response._construct's third): the same attributes, of the same values, as theirs set."""
    protocol = _twistedcompat.PromptClientProtocol()
    protocol.makeConnection(StringTransport())
    request = _twistedcompat.PreparedRequest(b"POST", b"POST / HTTP/1.1\r\n\r\n")
    answer = protocol.request(request)
    transport = protocol._transportProxy
    protocol.dataReceived(b"HTTP/1.1 201 Made\r\nX-A: 1\r\nContent-Length: 2\r\n\r\n")
    ours = answer.result
    theirs = _newclient.Response._construct((b"HTTP", 1, 1), 201, b"Made", Headers({b"X-A": [b"1"]}), transport,
                                            request)
    theirs.length = 2
    assert type(ours) is type(theirs) and type(ours.headers) is Headers
    assert sorted(vars(ours)) == sorted(vars(theirs))
    for name, value in vars(theirs).items():
        if name != "request":
            assert vars(ours)[name] == value, name
    assert type(ours.request) is type(theirs.request) and ours.request.original is request
    assert ours.headers._rawHeaders == theirs.headers._rawHeaders and Headers.__slots__ == ["_rawHeaders"]
