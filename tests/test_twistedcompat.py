"""Each private Twisted name the gateway uses still exists and behaves as assumed.

A failure here means the installed Twisted changed something
L{gomodel._twistedcompat} relies on: fix that module, not the callers.
"""

import inspect

from twisted.internet import abstract, tcp
from twisted.web import _newclient, client, http, resource, server
from twisted.internet.protocol import Protocol
from twisted.internet.testing import StringTransport

from gomodel import _twistedcompat


def test_channel_holds_the_request_line_until_the_body_is_in():
    channel = http.HTTPChannel()
    channel.makeConnection(StringTransport())
    seen = []

    class Probe(http.Request):
        def gotLength(self, length):
            seen.append(_twistedcompat.request_line(self))
            super().gotLength(length)

    channel.requestFactory = Probe
    channel.dataReceived(b"POST /v1/files?x=1 HTTP/1.1\r\nHost: h\r\nContent-Length: 2\r\n\r\n")
    assert seen == [(b"POST", b"/v1/files?x=1")]
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

    class Idle:
        connected, disconnecting, producerPaused = 1, False, False
        writes = 0

        def doWrite(self):
            self.writes += 1

    transport = Idle()
    _twistedcompat.send_now(transport)
    transport.producerPaused = True
    _twistedcompat.send_now(transport)
    _twistedcompat.send_now(object())  # no doWrite (TLS): left alone
    assert transport.writes == 1


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


def test_plain_headers_are_set_as_setRawHeaders_would():
    from twisted.web.http_headers import Headers

    from gomodel._twistedcompat import header_name, plain_headers

    ours, theirs = Headers({b"x-ratelimit-limit-requests": [b"1"]}), Headers()
    raw = plain_headers(ours)
    raw[header_name("x-ratelimit-limit-requests")] = [b"600"]
    raw[header_name("X-RateLimit-Reset-Tokens")] = [b"6m0s"]
    theirs.setRawHeaders("x-ratelimit-limit-requests", ["600"])
    theirs.setRawHeaders("X-RateLimit-Reset-Tokens", ["6m0s"])
    assert ours == theirs
    assert ours.getRawHeaders(b"X-RATELIMIT-LIMIT-REQUESTS") == [b"600"]
    assert sorted(ours.getAllRawHeaders()) == sorted(theirs.getAllRawHeaders())
