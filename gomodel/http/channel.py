"""The client connection: HTTP/1.1 requests parsed by llhttp (httptools), answered by Twisted's Request.

Twisted's channel parses a request in Python, a line at a time (its line
receiver, the request line, each header's name and value checked and
re-encoded): more than a quarter of the bytecodes a relayed chat request cost
the gateway. Here Node.js's parser, llhttp (through httptools, which uvicorn
uses too), reads the bytes in C and calls back once for the target, once per
header, once per piece of body and once at the end; it is also the stricter
parser (no bare LF, no whitespace before a colon, one Content-Length, no
Content-Length beside Transfer-Encoding: what request smuggling relies on).

What Twisted's channel does around the parsing stays as it was: one request
answered at a time, in order; what a client sends while an answer is in
progress is held (16 kB, then reading stops) until it is done; the request's
head is checked (C{gotLength}) before its body is read; C{100 Continue} is
sent when the client asks for it (one refused at its head is answered at once
instead, its body never read); a request that ends the connection
(C{Connection: close}, HTTP/1.0, a refusal) is the last one read. A connection
closed with bytes of its client's left unread (a body refused at its head, a
request the channel cannot read, requests pipelined after the last one) closes
lingering, as nginx's does (L{GatewayChannel._linger}). The
channel builds on C{HTTPChannel}'s names for that state (C{requests},
C{_handlingRequest}, C{_dataBuffer}, C{_networkProducer},
C{_waitingForTransport}), which C{tests/test_twistedcompat.py} checks.
"""

from http import HTTPStatus
from itertools import chain

import httptools
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IHalfCloseableDescriptor, ISSLTransport
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import http
from twisted.web.http_headers import Headers

from gomodel import _twistedcompat
from gomodel.errors import InvalidRequest
from gomodel.http.context import CLIENT_GONE_STATUS
from gomodel.http.headers import CONTENT_LENGTH, EXPECT, HOST, TRANSFER_ENCODING

_log = Logger()

# The HTTP versions the channel speaks (httptools gives the version as text), as the status line writes them.
_VERSIONS = {"1.1": b"HTTP/1.1", "1.0": b"HTTP/1.0"}
# Requests read ahead of their turn from one read (pipelining): the last one read closes the connection.
PIPELINE_DEPTH = 16
# The reason phrases Twisted has none for, which it writes "Unknown Status" (429 Too Many Requests, 422...).
_UNKNOWN = b"Unknown Status"
_PHRASES = {status.value: status.phrase.encode("ascii") for status in HTTPStatus if status.value not in http.RESPONSES}
_LINE_START = b"\r\n%b: ".__mod__  # a header's name -> the start of each of its lines (L{writeHeaders})
# (the type attributes the head's lines are made with, looked up once: CPython 3.11 specializes no read of a type's
# attribute, some 400 instructions each)
_chain = chain.from_iterable
_join = bytes.join


class _BadRequest(Exception):
    """A request the channel answers with 400 (or C{status}): over a limit of its head, in an HTTP version it
    does not speak, or not valid HTTP/1.1 in a way llhttp lets through."""

    status = b"400 Bad Request"


class _NotImplemented(_BadRequest):
    """A request the gateway does not implement (a transfer coding but chunked, a method no one knows): 501."""

    status = b"501 Not Implemented"


class _TargetTooLong(_BadRequest):
    """A request whose target is longer than the gateway parses: 414 (RFC 9112 3)."""

    status = b"414 URI Too Long"


class _HeadersTooLarge(_BadRequest):
    """A request whose headers are past the gateway's limits (their size, their number): 431 (RFC 6585 5)."""

    status = b"431 Request Header Fields Too Large"


_TIMED_OUT = b"408 Request Timeout"
# The error code of each status a refused request is answered with.
_CODES = {_BadRequest.status: "bad_request", _NotImplemented.status: "not_implemented", _TIMED_OUT: "request_timeout",
          _TargetTooLong.status: "uri_too_long", _HeadersTooLarge.status: "headers_too_large"}


class _Stopped(Exception):
    """Raised from a parser callback to stop reading: the connection takes no more requests."""


class GatewayChannel(http.HTTPChannel):
    """An HTTP/1.1 connection of the gateway's: requests parsed by llhttp, on a prompt connection, with the
    connection's addresses looked up once and an answer's head written with its first bytes.

    Twisted's Site wraps each channel in a protocol that can negotiate HTTP/2; the gateway speaks HTTP/1.1
    only, so it serves this channel directly. Each request asks its channel for both addresses (a
    getsockname call and two address objects per request otherwise). The connection writes at once
    (L{gomodel._twistedcompat.prompt}), so the status line and headers wait for the body's first bytes, or
    the end of the request, to leave with them in one write.

    @ivar maxHeaders: the most headers a request may have (Twisted's 500).
    @ivar totalHeadersSize: the most bytes a request's target and headers may take (Twisted's 16 kB).
    """

    _parser = None  # None once the connection takes no more requests
    _receiving = None  # the request whose head or body is being read
    _busy = False  # in _receive: a request answered meanwhile leaves the next to it
    _head_open = False  # a request's head is being read
    _peer = None
    _host = None
    _head = None  # the answer's status line and headers, not yet written
    _target = b""  # the target of the request whose head is being read, as far as it came
    active = True  # something came in or went out since the site's last idle sweep
    idle_since = None  # when a sweep last found it active (GatewaySite.sweep_idle)
    # The request whose head or body (watched_head) a sweep saw arriving, and since when (GatewaySite.sweep_idle).
    watched = None
    watched_head = False
    watched_since = None
    # The gateway's own hold on the client (pause_reading: an upload's disk lags), which is not the client's time
    # (GatewaySite.sweep_idle): seconds held that no sweep counted yet, and since when it holds it now (None: not).
    held_for = 0.0
    held_since = None
    unsent = 0  # bytes of its answers it held to send at the site's last idle sweep (GatewaySite.sweep_idle)
    unread = False  # its client sent bytes it will not read (a refused body, pipelined past the last request)
    lingering_since = None  # when its lingering close began (_linger; GatewaySite.sweep_idle ends it)

    def connectionMade(self):
        _twistedcompat.prompt(self.transport)
        super().connectionMade()
        self._parser = httptools.HttpRequestParser(self)
        self._received = []  # requests read whole, waiting for the ones before them to be answered
        self.site.channels.add(self)

    def dataReceived(self, data):
        self.active = True
        if self._handlingRequest or self._busy:
            # Held until the answer in progress is done, as Twisted holds it: past 16 kB, reading stops.
            self._dataBuffer.append(data)
            if not self._waitingForTransport and sum(map(len, self._dataBuffer)) > self._optimisticEagerReadSize:
                self._networkProducer.pauseProducing()
            return
        self._receive(data)

    def _receive(self, data):
        """Parse C{data} and what was held, starting each request read whole in order, one at a time."""
        self._busy = True
        try:
            while True:
                self._parse(data)
                received = self._received
                while received and not self._handlingRequest:
                    request = received.pop(0)
                    self._handlingRequest = True
                    request.requestReceived(request.method, request.uri, request.clientproto)
                if self._handlingRequest or not self._dataBuffer:
                    return
                data = b"".join(self._dataBuffer)
                self._dataBuffer = []
        finally:
            self._busy = False

    def _parse(self, data):
        parser = self._parser
        if parser is None or not data:
            if data:
                self.unread = True  # after the last request the connection takes, the client's bytes are dropped
            return
        try:
            parser.feed_data(data)
        except httptools.HttpParserUpgrade as upgrade:
            self._upgraded(data[upgrade.args[0]:])
        except httptools.HttpParserCallbackError as e:
            cause = e.__context__
            if isinstance(cause, _BadRequest):
                self._bad_request(str(cause), cause.status)
            elif not isinstance(cause, _Stopped):
                raise cause from None  # a defect of the gateway's, not of the request: the reactor logs it
        except httptools.HttpParserInvalidMethodError as e:  # a method llhttp does not know: RFC 9110 15.6.2
            self._bad_request(str(e), _NotImplemented.status)
        except httptools.HttpParserError as e:
            self._bad_request(str(e))
        else:
            if self._head_open:
                # A head still arriving (llhttp holds a header until its end): it may take the read it began
                # in, then totalHeadersSize bytes more.
                if self._head_read < 0:
                    self._head_read = 0
                else:
                    self._head_read += len(data)
                    if self._head_read > self.totalHeadersSize:
                        self._bad_request("its headers are too large", _HeadersTooLarge.status)
            elif self._chunked is not None:
                self._bound_framing(len(data))

    def _bound_framing(self, size):
        """Bound what a chunked body's reads bring but its data (a chunk's size line and extensions, the
        trailers: llhttp holds each until its end, and each trailer is kept) as a head is bounded: the read
        that brought the body's last data, then L{totalHeadersSize} bytes more (C{size}: this read's)."""
        request = self._chunked
        if request is not self._receiving:  # (read whole, or refused)
            self._chunked = None
            return
        got = (request.content.tell() if request.streamed else request._received) + request.chunks
        if got != self._chunked_got:
            self._chunked_got, self._framing_read = got, 0
            return
        self._framing_read += size
        if self._framing_read > self.totalHeadersSize:
            self._bad_request("its chunks' framing or trailers are too large")

    # llhttp's callbacks (httptools calls them by these names).

    def on_message_begin(self):
        requests = self.requests
        if requests:
            last = requests[-1]
            if len(requests) >= PIPELINE_DEPTH and last.keep_alive:
                last.close_after()  # a pipelining client sends the rest again
            if not last.keep_alive:
                self._parser = None
                self.unread = True
                raise _Stopped()
        request = self.requestFactory(self)
        requests.append(request)
        self._receiving = request
        self._pairs = []  # each header's name and value, as llhttp gives them
        self._target = b""
        self._head_open = True
        self._head_read = -1  # bytes read for the head after the read it began in (_parse)

    def on_url(self, piece):
        self._target += piece
        if len(self._target) > self.totalHeadersSize:
            raise _TargetTooLong("its target is too long")

    def on_header(self, name, value):
        # Kept as they come (their number and size are checked once the head is in; until then _parse
        # bounds what a head may take): on_headers_complete makes them the request's headers at once.
        self._pairs += (name, value)

    def on_headers_complete(self):
        parser = self._parser
        request = self._receiving
        self._head_open = False
        version = _VERSIONS.get(parser.get_http_version())
        if version is None:
            raise _BadRequest("the gateway speaks HTTP/1.1 and HTTP/1.0")
        target = self._target
        pairs = self._pairs
        if len(pairs) > 2 * self.maxHeaders:
            raise _HeadersTooLarge("it has too many headers")
        if len(target) + sum(map(len, pairs)) + 2 * len(pairs) > self.totalHeadersSize:
            raise _HeadersTooLarge("its headers are too large")
        headers = _twistedcompat.plain_headers(request.requestHeaders)
        _twistedcompat.keep_headers(headers, pairs)
        hosts = headers.get(HOST)
        if hosts is None and version == b"HTTP/1.1" or hosts is not None and len(hosts) != 1:
            raise _BadRequest("it needs one Host header")  # RFC 9112 3.2
        if target[:1] != b"/" and target[:8].lower().startswith((b"http://", b"https://")):
            target = _origin_form(target, headers)
        method = parser.get_method()
        # Twisted sets these once the body is in (requestReceived sets them again); the head's check needs them.
        request.method, request.uri, request.clientproto = method, target, version
        length = headers.get(CONTENT_LENGTH)
        if length is not None:
            length = int(length[0])  # llhttp let only one, all digits, through
        elif TRANSFER_ENCODING in headers:
            length = None  # llhttp let only a body ending with chunked through
            if headers[TRANSFER_ENCODING][0].lower() != b"chunked":  # (gzip, chunked: RFC 9112 6.1)
                raise _NotImplemented("it has a transfer coding the gateway does not implement; send chunked only")
            self._chunked, self._chunked_got = request, -1  # (its framing is bounded: _bound_framing)
        else:
            length = 0
        # HTTP/1.0 connections are not kept (an answer without Content-Length ends with the connection).
        if version != b"HTTP/1.1":
            request.keep_alive = False
        elif not parser.should_keep_alive():
            request.close_after()
        if parser.should_upgrade():
            # The gateway answers a request asking to switch protocols as any other (RFC 9110 7.8), and
            # after a CONNECT, whose tunnel it does not serve, it closes; llhttp stops after the head either way.
            if method == b"CONNECT":
                request.close_after()
            elif length is None:
                self._framing_after_upgrade = b"Transfer-Encoding: chunked"
            elif length:
                self._framing_after_upgrade = b"Content-Length: %d" % length
        expect = headers.get(EXPECT) if length != 0 and version == b"HTTP/1.1" else None
        request.gotLength(length)
        if expect is not None and expect[0].lower() == b"100-continue":
            if self.requests[0] is not request:
                self._expecting = request  # (pipelined behind another: invited when its turn comes, requestDone)
            elif EXPECT in headers:
                self._send100Continue()
            else:  # gotLength dropped it: refused at its head (401, 413)
                self._answer_unread(request)

    def _answer_unread(self, request):
        """Answer C{request}, refused at its head, at once: its client waits for C{100 Continue} before it sends
        the body (RFC 9110 10.1.1), so the body is never read, and the connection, which the refusal closes
        after its answer, takes nothing more."""
        self._take_unread(request)
        raise _Stopped()

    def _take_unread(self, request):
        """Take C{request} as read whole (L{_answer_unread}): the connection reads nothing more."""
        self._parser = None
        self._receiving = None
        self.unread = True  # (the body its client may send all the same)
        self._received.append(request)

    _expecting = None  # a request pipelined behind another whose client waits for 100 Continue (requestDone)

    def _invite(self, request):
        """Now first in line, C{request}, pipelined behind others, its body not come, gets the C{100 Continue}
        its client waits for, or, refused at its head, its answer at once (L{_answer_unread})."""
        if EXPECT in _twistedcompat.plain_headers(request.requestHeaders):
            self._send100Continue()
        else:
            self._take_unread(request)

    def on_body(self, data):
        request = self._receiving
        request.handleContentChunk(data)
        if request.too_large and self.requests[0] is request:
            # Past the body limit (a chunked body, or one announced past it sent without waiting for 100
            # Continue): its 413 now, not once the body, however long, has come; the close lingers (what the
            # client still sends is read and dropped, not reset).
            self._answer_unread(request)

    def on_chunk_header(self):
        # A chunked body's framing is bytes the client sent: its deadline counts them (GatewaySite.sweep_idle).
        # llhttp calls this for a chunked body's chunks only: a body with a Content-Length pays nothing for it.
        self._receiving.chunks += 1

    def on_message_complete(self):
        if self._framing_after_upgrade is not None:
            return  # llhttp stopped after an Upgrade head: the body comes after that (_upgraded)
        self._received.append(self._receiving)
        self._receiving = None

    _framing_after_upgrade = None  # how a body llhttp left behind an Upgrade head is framed (its header line)
    _chunked = None  # the request whose chunked body is being read (_bound_framing)
    _chunked_got = -1  # what of its body (data and chunks) had come at the last read that brought any
    _framing_read = 0  # bytes read since that read

    def _upgraded(self, rest):
        """Go on reading after a request that asked to switch protocols: its body, or the next request.

        llhttp stops after such a request's head, its body not read; a new parser is put in the body's
        place with a made-up head (L{_AfterUpgrade}) and reads the rest as it follows.
        """
        if not self.requests[-1].keep_alive:
            self._parser = None
            return
        framing, self._framing_after_upgrade = self._framing_after_upgrade, None
        if framing is None:
            self._parser = httptools.HttpRequestParser(self)
        else:
            self._parser = httptools.HttpRequestParser(_AfterUpgrade(self))
            self._parser.feed_data(b"POST / HTTP/1.1\r\n" + framing + b"\r\n\r\n")
        self._parse(rest)

    def head_timed_out(self):
        """The head of the request being read has taken too long to arrive (L{GatewaySite.sweep_idle}):
        answer 408 and close."""
        self._bad_request("its head took too long to arrive", _TIMED_OUT)

    def body_timed_out(self):
        """The body of the request being read arrives too slowly (L{GatewaySite.sweep_idle}): answer 408 and
        close."""
        self._bad_request("its body arrived too slowly", _TIMED_OUT)

    def pause_reading(self):
        """Stop reading the client's bytes for the gateway's own sake (an upload's disk lags, L{gomodel.api.uploads}):
        until L{resume_reading}, the client cannot send, and the body being read is not timed
        (L{GatewaySite.sweep_idle}). Rare: kept out of the request path."""
        if self.held_since is None and self.transport is not None:
            self.held_since = self.site.reactor.seconds()
            self.transport.pauseProducing()

    def resume_reading(self):
        """Read the client's bytes again after L{pause_reading}."""
        since = self.held_since
        if since is not None:
            self.held_since = None
            self.held_for += self.site.reactor.seconds() - since
            self.transport.resumeProducing()

    def take_held(self, now) -> float:
        """The seconds L{pause_reading} held the client back, up to C{now}, that no call before counted
        (L{GatewaySite.sweep_idle}'s)."""
        held, self.held_for = self.held_for, 0.0
        since = self.held_since
        if since is not None:
            held += now - since
            self.held_since = now
        return held

    def _bad_request(self, reason, status=_BadRequest.status):
        """Answer 400 (or C{status}) and close; requests read whole before the bad bytes are answered first. The
        answer carries the request's C{X-Request-Id}, and its record goes to the site (L{GatewaySite.answered_early}:
        the access log, the metrics)."""
        request = self._receiving
        self._parser = None
        self._receiving = None  # read no further: no sweep times it (and answers it again)
        self.unread = True  # (what follows the bad bytes, or the body of a head that took too long)
        if self._received:
            self._received[-1].close_after()
            return
        _log.debug("A bad request from {peer}: {reason}", peer=self.getPeer(), reason=reason)
        code = _CODES[status]
        error = InvalidRequest(f"The request is not valid HTTP/1.1: {reason}.", code=code, status=int(status[:3]))
        request_id = self.site.answered_early(request, self._target, error.status, code)
        body, anthropic = self.site.early_body(request, self._target, error)
        self.transport.write(b"HTTP/1.1 %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n"
                             b"X-Request-Id: %s\r\n%sConnection: close\r\n\r\n%s"
                             % (status, len(body), request_id, b"request-id: %s\r\n" % request_id if anthropic else b"",
                                body))
        self.loseConnection()

    def requestDone(self, request):
        """The answer to C{request}, the first in line, is done: start the next, or close the connection."""
        self._write_head()
        self.active = True
        if request is not self.requests[0]:
            raise TypeError(request)
        del self.requests[0]
        self._handlingRequest = False
        if not self._waitingForTransport:
            self._networkProducer.resumeProducing()
        if not request.keep_alive:
            self._parser = None
            if self._received or self._dataBuffer:
                self.unread = True
            self._received.clear()  # _receive may be going through it
            self._dataBuffer = []
            self.loseConnection()
            return
        expecting = self._expecting
        if expecting is not None and self.requests and self.requests[0] is expecting:
            self._expecting = None
            if expecting is self._receiving:  # (its body not come: its client waits)
                self._invite(expecting)
        if not self._busy and (self._received or self._dataBuffer):
            self._receive(b"")

    def connectionLost(self, reason):
        self._head = None
        self._parser = None
        self.lose_unread(CLIENT_GONE_STATUS)
        self.site.channels.discard(self)
        super().connectionLost(reason)

    def lose_unread(self, status, code=None):
        """Record the request whose body was arriving (its head whole, no route saw it yet) as lost: its client
        left (C{status} 499), or the gateway cuts it (C{code}: a drain out of time); it is then read no further."""
        request = self._receiving
        if request is not None and not self._head_open and request.context is None:
            self._receiving = None
            self.site.lost_early(request, self._target, status, code)

    def getPeer(self):
        if self._peer is None:
            self._peer = super().getPeer()
        return self._peer

    def getHost(self):
        if self._host is None:
            self._host = super().getHost()
        return self._host

    def writeHeaders(self, version, code, reason, headers):
        """Make the status line and C{headers} one piece, written with the body's first bytes
        (L{write}) or when the request is done: Twisted hands the transport four pieces per header,
        each checked in Python (a managed key's six C{x-ratelimit-*} headers alone are 24)."""
        if not isinstance(headers, Headers):
            super().writeHeaders(version, code, reason, headers)
            return
        if reason == _UNKNOWN:  # (Twisted's for a code it has no phrase for: a 429, a 422)
            reason = _PHRASES.get(int(code), reason)
        plain = _twistedcompat.plain_headers(headers)
        # Each header's lines, each begun with CRLF: b"\r\nName: ", then its values joined by that (a line per
        # value), in C whatever the number of values; then an AnswerHeaders' own lines.
        starts = list(map(_LINE_START, plain))
        self._head = b"".join((version, b" ", code, b" ", reason, *_chain(zip(starts, map(_join, starts,
                               plain.values()))), b"\r\n", getattr(headers, "lines", b""), b"\r\n"))

    def write(self, data):
        head = self._head
        if head is not None:
            self._head = None
            data = head + data
        self.transport.write(data)

    def writeSequence(self, iovec):
        head = self._head
        if head is not None:
            self._head = None
            iovec = [head, *iovec]
        self.transport.writeSequence(iovec)

    def _write_head(self):
        """Write an answer's head still held (an answer without a body, or a producer's before it writes)."""
        head = self._head
        if head is not None:
            self._head = None
            self.transport.write(head)

    def registerProducer(self, producer, streaming):
        self._write_head()
        super().registerProducer(producer, streaming)

    def loseConnection(self):
        self._write_head()
        if self.unread and self.lingering_since is None and self.transport is not None:
            self._linger()
            return None
        return super().loseConnection()

    def _linger(self):
        """Close lingering, as nginx does, a connection whose client sent bytes the channel did not read:
        closed at once, the kernel would reset it for them, and its client, still sending (a body it did not
        wait to be invited to send), would see the reset instead of the answer. The answer leaves, then the
        gateway's side is shut (a plain TCP or UNIX socket's write side; a TLS connection says it closes);
        what the client still sends is read and dropped (L{_drop}) until it closes, or until
        L{GatewaySite.sweep_idle} ends it (L{gomodel.http.site.LINGER_TIME}, or a sweep's interval without
        a byte)."""
        self.lingering_since = self.site.reactor.seconds()
        self.active = True
        self.dataReceived = self._drop  # (an attribute: the request path pays nothing)
        self._dataBuffer = []
        transport = self.transport
        self._networkProducer.unregisterProducer()  # (as Twisted's loseConnection: its writes end then)
        if IHalfCloseableDescriptor.providedBy(transport) and not ISSLTransport.providedBy(transport):
            transport.loseWriteConnection()  # (a TLS socket's would shut it below TLS, without its close alert)
        else:
            transport.loseConnection()
        self.held_since = None
        transport.resumeProducing()  # (reading may be paused: a hold behind an answer, an upload's lag)
        # A request the channel answered itself (its body too slow: a 408) ends now, not once its client goes:
        # its upload's sink is let go, and a drain does not wait for it.
        requests, self.requests = self.requests, []
        for request in requests:
            request.connectionLost(Failure(ConnectionDone("the gateway answered it itself and closed")))

    def _drop(self, data):
        """Drop what a lingering connection's client sends (L{_linger})."""
        self.active = True


class _AfterUpgrade:
    """A parser's callbacks that pass everything on to the channel but the first head: the made-up one
    that puts a new parser where llhttp left a body behind an Upgrade head (L{GatewayChannel._upgraded})."""

    def __init__(self, channel):
        self._channel = channel
        self._made_up = True

    def on_message_begin(self):
        if not self._made_up:
            self._channel.on_message_begin()

    def on_url(self, piece):
        if not self._made_up:
            self._channel.on_url(piece)

    def on_header(self, name, value):
        if not self._made_up:
            self._channel.on_header(name, value)

    def on_headers_complete(self):
        if self._made_up:
            self._made_up = False
        else:
            self._channel.on_headers_complete()

    def on_body(self, data):
        self._channel.on_body(data)

    def on_chunk_header(self):
        self._channel.on_chunk_header()

    def on_message_complete(self):
        self._channel.on_message_complete()


def _origin_form(target: bytes, headers: dict) -> bytes:
    """An absolute-form target (C{http://host/path?query}, which a server must accept: RFC 9112 3.2.2) as
    the origin-form the routes read; its authority becomes the request's Host (in C{headers}, a
    L{Headers}' dict), as the RFC says."""
    rest = target.split(b"//", 1)[1]
    end = len(rest)
    for mark in (b"/", b"?"):
        at = rest.find(mark)
        if 0 <= at < end:
            end = at
    headers[HOST] = [rest[:end]]
    path = rest[end:]
    return path if path[:1] == b"/" else b"/" + path
