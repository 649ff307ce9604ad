"""Every use of Twisted's private names, in one place (but the state of HTTPChannel's that the client
connection, L{gomodel.http.channel}, keeps as Twisted does).

The gateway reaches below Twisted's public API where the public one costs
measurable time per request (the relay client, the request's C{process}, the
early write).
Each touch is here, named for what it does, and each is checked by
C{tests/test_twistedcompat.py}, which fails loudly on a Twisted that changed
it; C{setup.py} caps Twisted below the next major version for the same reason.
"""

import errno
import select
import signal
import socket
import sys
from functools import partial
from operator import attrgetter
from types import MethodType

import httptools
from twisted.internet import tcp
from twisted.internet.abstract import FileDescriptor
from twisted.internet.defer import CancelledError, Deferred, fail, passthru, succeed
from twisted.internet.endpoints import _WrappingProtocol
from twisted.internet.error import ConnectionDone
from twisted.internet.main import CONNECTION_DONE, CONNECTION_LOST
from twisted.internet.posixbase import _NO_FILEDESC
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python import log
from twisted.python.failure import Failure
from twisted.web import resource, server
from twisted.web._newclient import (HTTP11ClientProtocol, HTTPParser, RequestNotSent, Response, ResponseDone,
                                     ResponseFailed, ResponseNeverReceived, TransportProxyProducer,
                                     _ClientRequestProxy)
from twisted.web.http import PotentialDataLoss, _DataLoss
from twisted.web.client import HTTPConnectionPool, _HTTP11ClientFactory
from twisted.web.http_headers import Headers, _nameEncoder
from zope.interface import directlyProvidedBy


def header_name(name: str) -> bytes:
    """C{name} as L{Headers} keeps and writes it (for L{plain_headers}, and header lines the gateway
    formats itself)."""
    return _nameEncoder.encode(name)


def keep_headers(headers: dict, pairs: list):
    """Put the headers in C{pairs} (name, value, name, value... as llhttp gives them) into C{headers}, a
    L{Headers}' dict (L{plain_headers}), as Twisted's parsers would: names in Header-Case, each one's values
    in order, trailing whitespace stripped (llhttp strips the leading, and lets no CR, LF or other control
    character through). In C but for names not seen before and names given twice."""
    canonical = list(map(_canonical_name, pairs[::2]))
    if None in canonical:
        canonical = [known or _nameEncoder.encode(name) for known, name in zip(canonical, pairs[::2])]
    headers.update(zip(canonical, map(list, zip(map(_rstrip, pairs[1::2])))))
    if len(headers) < len(canonical):  # a name more than once: its values in order
        headers.clear()
        for name, value in zip(canonical, map(_rstrip, pairs[1::2])):
            headers.setdefault(name, []).append(value)


# A header name as given -> as Headers keeps it: the cache Twisted's name encoder fills (up to 10,000; the same dict
# for good). Its get and bytes.rstrip, looked up once (CPython 3.11 specializes no attribute read of a dict's method
# or a type's: some 400 instructions each, two per keep_headers, two of those per request).
_CANONICAL_NAMES = _nameEncoder._canonicalHeaderCache
_canonical_name = _CANONICAL_NAMES.get
_rstrip = bytes.rstrip


# plain_headers(headers): the dict C{headers} (a L{Headers}) keeps: name (made with L{header_name}) -> list of values,
# read without C{getRawHeaders}' re-encoding of the name asked for. An attrgetter, in C: a dozen calls a request, each
# a Python frame of three bytecodes as a function.
plain_headers = attrgetter("_rawHeaders")


class _IdleSince(float):
    """What L{SweptPool} keeps where Twisted's pool keeps a cached connection's timer: when it went idle (the
    number itself: made in C, without an C{__init__} frame). Twisted cancels it when the connection is taken
    again or closed; nothing is scheduled."""

    __slots__ = ()

    def cancel(self):
        pass


class SweptPool(HTTPConnectionPool):
    """Twisted's connection pool, its idle connections closed by L{close_idle}, a sweep, rather than a
    timer each: Twisted's arms one (C{callLater}) for every connection put back and cancels it when the
    connection is taken again, two timer operations per upstream request.

    A connection's state is read as C{HTTP11ClientProtocol} keeps it (C{_state}): its C{state} property costs a
    frame, and a read CPython 3.11 leaves unspecialized, each time."""

    def _putConnection(self, key, connection):
        if connection._state != "QUIESCENT":
            super()._putConnection(key, connection)  # Twisted logs that bug and keeps nothing
            return
        connections = self._connections.setdefault(key, [])
        if len(connections) == self.maxPersistentPerHost:
            dropped = connections.pop(0)
            dropped.transport.loseConnection()
            del self._timeouts[dropped]
        connections.append(connection)
        self._timeouts[connection] = _IdleSince(self._reactor.seconds())

    def cached(self, key):
        """A cached connection of C{key}, taken from the pool as C{getConnection} would take it (the
        oldest ready one), or None: without the Deferred C{getConnection} wraps it in."""
        connections = self._connections.get(key)
        while connections:
            connection = connections.pop(0)
            del self._timeouts[connection]
            if connection._state == "QUIESCENT":
                return connection
        return None

    def close_idle(self, early=0.0):
        """Close the cached connections idle for C{cachedConnectionTimeout} less C{early} seconds or more
        (a sweep every C{early} seconds closes each within the timeout, never after it)."""
        limit = self._reactor.seconds() - self.cachedConnectionTimeout + early
        for key, connections in list(self._connections.items()):
            for connection in [c for c in connections if self._timeouts[c] <= limit]:
                self._removeConnection(key, connection)


def unix_socket_path(endpoint):
    """The path of a C{unix:} strports server endpoint (C{UNIXServerEndpoint}), or None for another kind."""
    path = getattr(endpoint, "_address", None) if type(endpoint).__name__ == "UNIXServerEndpoint" else None
    return path if isinstance(path, str) else None


def twistd_log_observer(twistd_options):
    """The observer twistd makes of its own logging options (C{--logfile}, its C{twistd.log} as a daemon,
    C{--syslog}), made as twistd makes it (a log file also rotates on SIGUSR1), as a L{twisted.logger}
    observer: twistd uses the application's observer instead of making its own."""
    from twisted.logger import ILogObserver, LegacyLogObserverWrapper
    from twisted.scripts._twistd_unix import UnixAppLogger

    observer = UnixAppLogger(twistd_options)._getLogObserver()
    return observer if ILogObserver.providedBy(observer) else LegacyLogObserverWrapper(observer)


def use_pool_factory(pool, factory):
    """Make C{pool} build its connections with C{factory} (a subclass of L{ClientFactory})."""
    pool._factory = factory


class WaitedDeferred(Deferred):
    """A L{Deferred} in every way, but that the one both-ways callback added first, alone, with nothing else added
    before it fires (what a coroutine's runner adds to the Deferred it awaits: L{gomodel.http.handling.Handling}), is
    called directly when it fires with a result: Twisted's C{callback} runs one through C{_startRunCallbacks} and
    the general loop of C{_runCallbacks} (chains, pauses, failures: about 150 bytecodes for that one call).

    That callback (the waiter) is kept apart from the callback chain until the Deferred fires. Anything else added
    (another callback, one with arguments), or a Deferred paused when it fires, failing, fired twice or debugging,
    puts the waiter back at the head of the chain, where C{addBoth} put it, and Twisted's own steps run. So do they
    once the waiter returned anything but None, or callbacks were added meanwhile: they go on from what it returned
    (or a Failure of what it raised) as Twisted's loop goes on after a callback, through a C{passthru} put in its
    place (a waiter that returns its own Deferred, which breaks its chain, is warned about under that name).
    """

    _waiter = None

    def addBoth(self, callback, *args, **kwargs):
        if args or kwargs or self.called or self._callbacks or self._waiter is not None:
            self._unwait()
            return super().addBoth(callback, *args, **kwargs)
        self._waiter = callback
        return self

    def addCallbacks(self, *args, **kwargs):
        self._unwait()
        return super().addCallbacks(*args, **kwargs)

    def addCallback(self, *args, **kwargs):
        self._unwait()
        return super().addCallback(*args, **kwargs)

    def addErrback(self, *args, **kwargs):
        self._unwait()
        return super().addErrback(*args, **kwargs)

    def errback(self, fail=None):
        self._unwait()
        super().errback(fail)

    def callback(self, result):
        waiter = self._waiter
        # (one that fired has no waiter: it was called, or put back by errback or an addBoth once fired)
        if waiter is None or self.paused or self.debug or self._callbacks:
            self._unwait()
            super().callback(result)
            return
        # (_startRunCallbacks' steps, then _runCallbacks' for one callback, its result None)
        self._waiter = None
        self.called = True
        self._canceller = None
        self._chainedTo = None
        self.result = result
        self._runningCallbacks = True
        try:
            value = waiter(result)
        except BaseException:
            value = Failure(captureVars=self.debug)
        self._runningCallbacks = False
        self.result = value
        if value is not None or self._callbacks:
            # (Twisted's loop goes on past a pause the waiter made: only a chained Deferred stops it)
            paused, self.paused = self.paused, 0
            self._callbacks.insert(0, _PASSING_ON)
            self._runCallbacks()
            self.paused += paused

    def _unwait(self):
        """Put the waiter kept apart back at the head of the callback chain."""
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            call = (waiter, (), {})
            self._callbacks.insert(0, (call, call))


# What a WaitedDeferred's chain goes on from after its waiter: its result, as the waiter left it.
_PASSING_ON = ((passthru, (), {}), (passthru, (), {}))


class PromptClientProtocol(HTTP11ClientProtocol):
    """Twisted's HTTP/1.1 client protocol on a L{prompt} connection, its answers parsed by llhttp
    (L{AnswerParser}) but a HEAD's.

    @ivar _answers: the L{AnswerParser} that read this connection's last prepared request's answer, kept
        for the next one, or None.
    """

    _answers = None

    def makeConnection(self, transport):
        prompt(transport)
        unwrap(transport, self)
        super().makeConnection(transport)

    def request(self, request):
        """Send C{request} and return a Deferred firing with its answer, as Twisted's C{request} does.

        A L{PreparedRequest} leaves in one write, and its answer is read by the connection's L{AnswerParser}
        (made for its first, then kept from one whole answer to the next: L{AnswerParser.again}) firing the
        Deferred returned: one Deferred per request, where Twisted makes three (the request's, the
        written body's, its parser's, chained) and a parser per answer. Other requests (an Agent's) go through
        Twisted's C{request}, their answers read by llhttp too; a HEAD's answer by Twisted's parser (llhttp cannot be
        told that an answer has no body), the headers its C{Connection} names then set apart as llhttp's are.
        """
        if type(request) is not PreparedRequest or request.method == b"HEAD":
            answered = super().request(request)
            parser = self._parser
            if parser is not None and request.method == b"HEAD":  # (the first callback: before its caller's)
                answered.addCallback(_named_apart, parser.connHeaders)
            # Twisted made its parser and chained its Deferred to the one returned: another parser fires it.
            if parser is not None and request.method != b"HEAD" and not parser._everReceivedData:
                self._parser = AnswerParser(request, self._finishResponse, parser._responseDeferred)
                self._parser.makeConnection(self._transportProxy)
            return answered
        if self._state != "QUIESCENT":
            return fail(RequestNotSent())
        self._state = "WAITING"  # written whole: what Twisted's state is once writeTo's Deferred fired
        self.transport.write(request._data)
        self._finishedRequest = self._responseDeferred = answered = WaitedDeferred(self._cancel_waiting)
        self._currentRequest = request
        self._transportProxy = proxy = TransportProxyProducer(self.transport)
        parser = self._answers
        if parser is not None and parser.idle:
            parser.again(request, answered, proxy)
        else:
            self._answers = parser = AnswerParser(request, self._finish_whole, answered)
            parser.makeConnection(proxy)
        self._parser = parser
        return answered

    def _finish_whole(self, rest):
        """Twisted's C{_finishResponse_WAITING} for a request sent whole, whose state is C{WAITING} until
        its answer is whole: the same steps (the connection back to its pool, or closed), without the
        dispatch on the state, the connection header's name encoded, a log context around the pool's
        callback, a C{ConnectionDone} made for each answer and the parser's C{connectionLost} (the connection
        keeps it for its next answer: L{AnswerParser.again})."""
        if self._state != "WAITING" or self._parser is None:
            self._finishResponse(rest)  # (not what a request sent whole comes to: Twisted's steps)
            return
        self._state = "QUIESCENT"
        if b"close" in self._parser.connHeaders._rawHeaders.get(b"Connection", ()) or \
                not self._currentRequest.persistent:
            self._giveUp(Failure(ConnectionDone("synthetic!")))
            return
        self.transport.resumeProducing()  # in case it was paused: before it is quiescent again
        try:
            self._quiescentCallback(self)  # back to the pool before the request finishes
        except Exception:
            _log.failure("while invoking the connection pool's quiescent callback")
            self.transport.loseConnection()  # keeping it is an optimisation
        # (_disconnectParser's steps, but the parser's connectionLost: it is kept for the next answer, and ends
        # this one's body itself once this returns, as it would at that call)
        self._parser = self._currentRequest = self._finishedRequest = self._responseDeferred = None
        self._transportProxy._producer = None  # (its stopProxying)
        self._transportProxy = None

    def connectionLost(self, reason):
        """Twisted's, then the kept L{AnswerParser} let go of its llhttp parser, which holds its methods: a cycle
        only the gc would free otherwise."""
        super().connectionLost(reason)
        answers = self._answers
        if answers is not None:
            self._answers = None
            answers._parser = None

    def _cancel_waiting(self, answered):
        """Cancelling a request sent whole: as Twisted's (closes the connection; the answer fails with
        C{ResponseNeverReceived([CancelledError])}, or its body with C{ResponseFailed})."""
        self.transport.abortConnection()
        self._disconnectParser(Failure(CancelledError()))


_log = Logger()
# How every whole body ends, made once: a Failure works out its exception's class names when made.
_BODY_DONE = Failure(ResponseDone("Response body fully received"))
_CONTROL_HEADERS = frozenset(_nameEncoder.encode(name) for name in HTTPParser.CONNECTION_CONTROL_HEADERS)
_HTTP_1_1 = (b"HTTP", 1, 1)
_HTTP_VERSIONS = {"1.1": _HTTP_1_1, "1.0": (b"HTTP", 1, 0)}
_new = object.__new__


# The most bytes an upstream may send in a row without any of its answer's body (its head; a chunk's size line; its
# trailers), as Go's client bounds a head (a mebibyte here): past them the answer fails and its connection closes.
ANSWER_HEAD_LIMIT = 1024 * 1024


class AnswerParser(Protocol):
    """Twisted's C{HTTPClientParser} on llhttp (httptools): an upstream's answer read in C, one callback
    per header and per piece of body instead of Twisted's line-by-line parsing in Python.

    It does for C{HTTP11ClientProtocol} what Twisted's parser does: fires C{answered} with a
    L{Response} once the head is in (once the read that brought it is parsed: with its body when the
    body came in the same read; informational 1xx answers skipped), its connection headers apart
    (C{connHeaders}) and the connection paused until the body is asked for; delivers the body; calls
    C{finisher} when the answer is whole; and, when the connection is lost first, fails the answer as
    Twisted's would (C{ResponseNeverReceived}, C{ResponseFailed}; C{PotentialDataLoss} for a body that
    ends with the connection). A parse error raises from L{dataReceived}, and the protocol then closes
    the connection and fails the answer. Bytes after a whole answer (an upstream answering twice) close
    the connection too (Twisted drops them), and so do more than L{ANSWER_HEAD_LIMIT} bytes in a row without
    any of the body (a head or trailers without end; Twisted's parser bounds a line to 16 kB, not their number).

    A kept-alive connection's parser reads its next answer too, once the read that completed this one is parsed
    (L{idle}, L{again}): one parser (and llhttp's) per connection rather than per answer.

    @ivar idle: this answer is whole and its last read parsed: L{again} may set it to read the next.
    """

    response = None
    idle = False
    _in_body = False  # the head was read; the body's end has not been delivered
    _complete = False  # llhttp read the whole answer
    _until_close = False  # the body ends with the connection (neither Content-Length nor chunked)
    _bare = 0  # bytes read since the last read that brought some of the body (ANSWER_HEAD_LIMIT bounds them)
    _last = False  # llhttp reads nothing after this answer (an HTTP/1.0 one's, without keep-alive)

    def __init__(self, request, finisher, answered):
        self.request = request
        self.finisher = finisher
        self._responseDeferred = answered
        self.connHeaders = Headers()
        # llhttp hands each piece of body (one per chunk: an SSE stream's read holds one per event) to
        # this list's append, in C, no Python call each; they go to the response together once the
        # read is parsed (L{_deliver}). (httptools looks on_body up when the parser is made.)
        self._pieces = []
        self.on_body = self._pieces.append
        self._parser = httptools.HttpResponseParser(self)
        self._pairs = []
        self._reason = b""

    def again(self, request, answered, transport):
        """Read the answer to C{request} (firing C{answered}, pausing and resuming C{transport}) as a parser
        just made for it would: this parser is L{idle}, its last answer read whole on a connection kept alive."""
        self.idle = False
        self.request = request
        self._responseDeferred = answered
        self.transport = transport
        self.connHeaders._rawHeaders.clear()
        self.response = None
        self._complete = self._until_close = False
        self._bare = 0

    def dataReceived(self, data):
        try:
            self._parser.feed_data(data)
        finally:
            # The answer's Deferred fires once what came in this read is parsed: an answer that came
            # whole is whole when its Deferred fires (its body can be taken at once: whole_body).
            pieces = self._pieces
            if pieces:  # (L{_deliver}'s steps, in this frame: a paced stream's every read brings one piece)
                self._bare = 0
                body = b"".join(pieces)  # (of one piece: that piece itself, not a copy)
                pieces.clear()
                response = self.response
                if response._state == "CONNECTED":
                    response._bodyProtocol.dataReceived(body)
                else:
                    _deliver_to(response, body)
                # (pieces left to deliver: the answer's end was not in this read, which delivers them before it)
                answered = self._responseDeferred
                if answered is not None:  # (its head came in this read too)
                    self._responseDeferred = None
                    answered.callback(response)
            else:  # (a read without body: the head, a chunk's framing, the trailers; llhttp holds each header)
                self._bare += len(data)
                if self._bare > ANSWER_HEAD_LIMIT:
                    raise ValueError("the upstream sent more than ANSWER_HEAD_LIMIT bytes without a body")
                response = self.response
                if self._complete:  # (nothing of this answer is read after here: the connection's next may come)
                    self.idle = self._parser is not None and not self._last
                    self.request = self.response = None  # (an idle connection keeps neither)
                answered = self._responseDeferred
                if answered is not None and response is not None:
                    self._responseDeferred = None
                    answered.callback(response)

    def on_message_begin(self):
        if self._complete:
            raise ValueError("the upstream sent bytes after its whole answer")
        self._pairs = []
        self._reason = b""

    def on_status(self, piece):
        self._reason += piece

    def on_header(self, name, value):
        self._pairs += (name, value)  # the trailers of a chunked body come here too, and are dropped

    def on_headers_complete(self):
        parser = self._parser
        code = parser.get_status_code()
        if code < 200:
            return  # 100 Continue and the like: the answer follows
        headers = _new(Headers)  # (Headers' __init__ and Response's: what they set, without their frames)
        headers._rawHeaders = plain = {}
        control = self.connHeaders._rawHeaders
        keep_headers(plain, self._pairs)
        for name in _CONTROL_HEADERS.intersection(plain):
            control[name] = plain.pop(name)
        connection = control.get(b"Connection")
        if connection is not None:
            _set_apart_named(plain, control, connection)
        version = parser.get_http_version()
        if version != "1.1":
            self._last = True  # (llhttp reads on after an HTTP/1.0 answer only with keep-alive: Twisted reads on)
        # What Response._construct sets (a test checks it), one store each: an instance whose __dict__ is assigned
        # whole keeps a dict of its own, and every read of a class default (length, _bodyProtocol) or first store
        # of one then takes CPython's unspecialized path (more instructions than the stores' bytecodes save).
        response = _new(Response)
        response.version = _HTTP_VERSIONS.get(version, _HTTP_1_1)
        response.code = code
        response.phrase = self._reason
        response.headers = headers
        response._transport = self.transport
        response._bodyBuffer = []
        response._state = "INITIAL"
        response.request = _ClientRequestProxy(self.request)
        response.previousResponse = None
        self.response = response
        length = control.get(b"Content-Length")
        if length is not None:
            response.length = int(length[0])  # llhttp let only one, all digits, through
        if code == 204 or code == 304:
            response.length = 0
        elif length != [b"0"]:
            self._until_close = length is None and b"Transfer-Encoding" not in control
            self.transport.pauseProducing()  # the body waits for deliverBody, as with Twisted's parser
        self._in_body = True

    def _deliver(self):
        """Hand the body pieces parsed so far to the response in one piece (L{_deliver_to})."""
        pieces = self._pieces
        body = b"".join(pieces)
        pieces.clear()
        _deliver_to(self.response, body)

    def on_message_complete(self):
        if self.response is None:
            return  # the end of a 1xx answer
        if self._pieces:
            self._deliver()  # the body's last pieces, before its end
        self._complete = True
        self.finisher(b"")  # the connection goes back to its pool (or closes), then the body ends
        self._end_body(None)

    def connectionLost(self, reason=None):
        self._parser = None  # it holds this parser's methods: a cycle only the gc would free
        if self._in_body:
            self._end_body(reason)
        elif self._responseDeferred is not None and self.response is None:
            answered, self._responseDeferred = self._responseDeferred, None
            # (before its head, every byte that came is counted in _bare)
            answered.errback(Failure((ResponseFailed if self._bare else ResponseNeverReceived)([reason])))

    def _end_body(self, reason):
        if not self._in_body:
            return
        self._in_body = False
        response = self.response
        if self._complete:
            response._bodyDataFinished(_BODY_DONE)
        elif self._until_close:
            response._bodyDataFinished(Failure(PotentialDataLoss()))
        else:
            response._bodyDataFinished(Failure(ResponseFailed([reason, Failure(_DataLoss())], response)))


def _deliver_to(response, body):
    """Hand C{body} to C{response}: C{Response._bodyDataReceived}'s two states that take data, without its
    dispatcher."""
    state = response._state
    if state == "CONNECTED":
        response._bodyProtocol.dataReceived(body)
    elif state == "INITIAL":
        response._bodyBuffer.append(body)
    else:
        response._bodyDataReceived(body)  # raises, as Twisted's parser would have it


def _set_apart_named(plain, control, connection):
    """Move the headers that C{connection} (an answer's C{Connection} values) names from C{plain} to C{control}
    (L{Headers}' dicts): they are the upstream connection's (RFC 9110 7.6.1), not the answer's, and no client
    gets them. Twisted's parser keeps them among the answer's; only an answer with C{Connection} pays for it."""
    named = set(map(bytes.lower, map(bytes.strip, b",".join(connection).split(b","))))
    for name in list(plain):
        if name.lower() in named:
            control[name] = plain.pop(name)


def _named_apart(response, control):
    """C{response} (a HEAD's, read by Twisted's parser, whose connection headers are C{control}) without the headers
    its C{Connection} names (L{_set_apart_named}), as an L{AnswerParser}'s answer is."""
    connection = control._rawHeaders.get(b"Connection")
    if connection is not None:
        _set_apart_named(response.headers._rawHeaders, control._rawHeaders, connection)
    return response


def whole_body(response):
    """The body of C{response} when it has all come and nothing read it yet (an L{AnswerParser}'s answer
    that came in one read, as small answers do), taken as C{deliverBody} would take it; else None (then
    read it with C{deliverBody}). Without the protocol, Deferred and timer that reading costs. (L{peek_body}'s test,
    not a call of it: every answer passes here.)"""
    if getattr(response, "_state", None) == "DEFERRED_CLOSE" and response._reason is _BODY_DONE:
        body = b"".join(response._bodyBuffer)
        response._bodyBuffer = None
        response._state = "FINISHED"
        return body
    return None


def peek_body(response):
    """L{whole_body}'s body, left in C{response} for whoever reads it next; or None."""
    if getattr(response, "_state", None) == "DEFERRED_CLOSE" and response._reason is _BODY_DONE:
        return b"".join(response._bodyBuffer)
    return None


def read_again(response, body: bytes):
    """A stand-in for C{response}, whose C{body} was read already: its status and headers, and that body, whole
    as L{whole_body} and L{peek_body} take it (an answer looked at before it is relayed or read)."""
    again = Response._construct(getattr(response, "version", (b"HTTP", 1, 1)), response.code,
                                getattr(response, "phrase", b""), response.headers, None, None)
    again.length = len(body)
    again._bodyDataReceived(body)
    again._bodyDataFinished(_BODY_DONE)
    return again


def unwrap(transport, protocol):
    """Make C{transport} hand its events to C{protocol} itself where it hands them to a client endpoint's
    C{_WrappingProtocol} of C{protocol} (which only passes each on once it told that the connection was made:
    a call more on every read).

    Called by C{protocol}'s C{makeConnection}, which the wrapper calls as the connection is made; a wrapper
    that gives C{protocol} more than its events (the interfaces of a half-closeable protocol, a TLS
    handshake listener, a receiver of file descriptors), or another transport, is left as it is."""
    wrapper = getattr(transport, "protocol", None)
    if (wrapper.__class__ is _WrappingProtocol and wrapper._wrappedProtocol is protocol
            and not list(directlyProvidedBy(wrapper))):
        transport.protocol = protocol


class QuietClientFactory(_HTTP11ClientFactory):
    """The pool's connection factory: L{PromptClientProtocol}s, without a log line per connection
    opened and closed."""

    noisy = False

    def buildProtocol(self, addr):
        return PromptClientProtocol(self._quiescentCallback)


class PreparedRequest:
    """A request whose bytes are all known: what C{HTTP11ClientProtocol.request} needs of one.

    Twisted's own C{_newclient.Request} writes its head and then its body
    through a producer, a length-checking consumer and three Deferreds; a body
    already in memory leaves here in one write, with the head. The attributes
    are the ones C{HTTP11ClientProtocol} reads.
    """

    persistent = True
    headers = None
    bodyProducer = None
    absoluteURI = None
    _parsedURI = None

    def __init__(self, method: bytes, data: bytes):
        self.method = method
        self._data = data

    def writeTo(self, transport):
        transport.write(self._data)
        return succeed(None)

    def stopWriting(self):
        pass  # writeTo's Deferred has fired already: nothing is being written


class EndingRequest(server.Request):
    """A request that calls its C{ending} once, when it ends, as the Deferreds of C{notifyFinish} would
    fire: with None once the answer is finished, with the failure when the connection was lost first.
    Without a Deferred: C{_cleanup} and C{connectionLost} are where Twisted fires those. It is set up
    in one C{__init__} (Twisted's request classes take three).

    @ivar ending: a function of that result, or None.
    """

    ending = None
    # what makes the answer's headers (a Headers subclass)
    answer_headers = Headers

    def __init__(self, channel, queued=False):
        """What C{server.Request}'s and C{http.Request}'s C{__init__} set (Twisted 26: a test checks
        that the two set the same), in one frame where theirs take three, the answer's headers made
        once by L{answer_headers}, one store each (not as one dict assigned to C{__dict__}: the request's many
        reads of Twisted's class defaults, C{code}, C{startedWriting}, C{chunked}..., would then each take
        CPython's unspecialized path)."""
        self.notifications = []
        self.channel = channel
        self.client = channel.getPeer()
        self.host = channel.getHost()
        self.requestHeaders = Headers()
        self.received_cookies = {}
        self.responseHeaders = self.answer_headers()
        self.cookies = []
        self.transport = channel.transport
        self.queued = queued
        self._parsePOSTFormSubmission = channel.site._parsePOSTFormSubmission
        self._adapterCache = {}  # (components.Componentized's)

    def _cleanup(self):
        super()._cleanup()
        self._ended(None)

    def connectionLost(self, reason):
        super().connectionLost(reason)
        self._ended(reason)

    def _ended(self, result):
        ending = self.ending
        if ending is not None:
            self.ending = None
            ending(result)


def render_found(request, found):
    """The end of C{server.Request.process}: apply C{found}'s encoder, then render it."""
    if resource._IEncodingResource.providedBy(found):
        encoder = found.getEncoder(request)
        if encoder is not None:
            request._encoder = encoder
            request._plain_first = 0  # (its first write is Twisted's, which encodes it)
    request.render(found)


def handle_star(request):
    """Answer C{OPTIONS *} as Twisted does."""
    request._handleStar()


def exit_cleanly(reactor):
    """Make twistd exit with status 0 after a stop a signal asked for (it re-raises the signal otherwise).

    The reactor's signal handler notes the signal in C{reactor._exitSignal}
    before it stops; twistd reads it once the reactor has stopped and kills
    itself with it. A gateway that drained has stopped as it should.
    """
    if getattr(reactor, "_exitSignal", None) is not None:
        reactor._exitSignal = None


def stop_once_on_signals(reactor):
    """Make SIGTERM and SIGINT (and SIGHUP, once it runs: L{_drain_on_hangup}) stop C{reactor} once: one that
    comes while it stops already (a second
    Ctrl-C, or SIGTERM sent to the whole process group and then again by the primary of C{--workers}) is
    logged once and changes nothing (L{_StopOnce}).

    Twisted's handlers stop the reactor at every signal: the second stop raises ReactorNotRunning
    (logged as critical), and the signal is noted again after L{exit_cleanly} cleared it, so twistd
    exits with the signal's status. Twisted binds the reactor's C{sigInt} and C{sigTerm} when it starts
    running (C{_signalsFactory}): called before that (as twistd's C{makeService} is), this replaces them.
    """
    once = _StopOnce(reactor)
    reactor.sigInt = partial(once, type(reactor).sigInt)
    reactor.sigTerm = partial(once, type(reactor).sigTerm)
    reactor.callWhenRunning(_drain_on_hangup, reactor, once)


def _drain_on_hangup(reactor, once):
    """Make SIGHUP (the terminal closed, C{kill -HUP}) stop the gateway as SIGTERM does, with its drain, where
    it would otherwise end the process at once (its default action: streams cut, usage not written). A
    SIGHUP ignored (C{nohup}) or handled already stays so."""
    if getattr(signal, "SIGHUP", None) is None or signal.getsignal(signal.SIGHUP) is not signal.SIG_DFL:
        return

    def hangup(number, frame):
        _StopOnce.log.info("received SIGHUP: stopping as for SIGTERM")
        once(type(reactor).sigTerm, number, frame)

    signal.signal(signal.SIGHUP, hangup)


class _StopOnce:
    """The reactor's signal handlers: Twisted's for the first signal, nothing for those after it."""

    log = Logger()

    def __init__(self, reactor):
        self._reactor = reactor
        self._stopping = False  # a signal asked for the stop (it runs on the reactor's next turn)
        self._told = False

    def __call__(self, handler, number, frame=None):
        """Handle signal C{number} with Twisted's C{handler} (an unbound reactor method), unless the reactor stops
        already (a signal asked, or something called C{reactor.stop})."""
        reactor = self._reactor
        if not self._stopping and not reactor._stopped:
            self._stopping = True
            handler(reactor, number, frame)  # logs, notes the signal, stops the reactor on its next turn
        elif not self._told:
            self._told = True
            self.log.warn("received {signal} while already draining: ignored (the drain goes on)",
                          signal=signal.Signals(number).name)


def send_now(transport):
    """Hand what C{transport} holds to the kernel now.

    A TCP transport buffers a write it could not hand over at once (see
    L{prompt}) until the reactor next finds its socket writable: one more
    reactor turn (a poll, its dispatch) between a finished answer and the
    network. This does that write at once, exactly as the reactor would
    (C{doWrite}); what the socket does not take stays buffered for the
    reactor. Transports without C{doWrite} (TLS), closing ones, ones whose
    producer is paused (a full buffer) and ones holding nothing are left alone.
    """
    if transport.__class__ in _PROMPTS and transport._direct:
        return  # (a prompt connection that holds nothing: what it was given is with the kernel already)
    do_write = getattr(transport, "doWrite", None)
    if (do_write is not None and (transport.dataBuffer or transport._tempDataBuffer) and transport.connected
            and not transport.disconnecting and not transport.producerPaused):
        # A failed write leaves the transport registered for writing: the
        # reactor meets the error on its next turn and closes it as usual.
        do_write()


def fire_unwatched(deferred, result=None):
    """Fire C{deferred} with C{result} (not a Failure). A plain L{Deferred} (not a L{WaitedDeferred}, whose waiter is
    not among its callbacks) that nothing watches yet (no callback added, no debugging)
    is fired as Twisted's C{succeed} makes a fired one, without running its empty callback chain (about 60
    bytecodes): what is added or awaited later has the result at once. Any other is C{callback}'s."""
    if deferred._callbacks or deferred.called or deferred.debug:  # (its public callbacks: a deprecated property)
        deferred.callback(result)
        return
    deferred._canceller = None  # (as callback clears it: a canceller bound to its owner is a cycle)
    deferred.result = result
    deferred.called = True


def unsent(transport) -> int:
    """The bytes C{transport} holds, not yet handed to the kernel (of a TLS connection: its socket's), or 0
    for a transport that does not tell."""
    while transport is not None and not isinstance(transport, FileDescriptor):
        transport = getattr(transport, "transport", None)  # (TLS wraps the socket's transport)
    if transport is None:
        return 0
    return len(transport.dataBuffer) - transport.offset + transport._tempDataLen


# A write up to this size goes to the socket from write() itself (a larger one is buffered, as Twisted
# does, rather than copied after a partial send).
PROMPT_WRITE_LIMIT = FileDescriptor.SEND_LIMIT


class _Prompt:
    """A plain TCP connection that writes at once and pauses reading lazily (see L{prompt}).

    Twisted's connection buffers every write and registers its socket for
    writing (an C{epoll_ctl}), writes on the reactor's next turn, then
    unregisters it (another); pausing and resuming reading are two more. A
    gateway request crosses two connections and pays six such calls, each
    with its reactor bookkeeping in Python.

      - C{write}: when nothing is buffered before it, the data goes to the
        socket at once; only what the socket does not take is buffered, and
        then the reactor writes it as usual. A socket error buffers the data
        too: the reactor meets the error on its next turn and closes the
        connection as it always does.
      - C{pauseProducing}: nothing changes until the reactor finds data to
        read while paused; only then is reading really stopped. A pause
        resumed before that (an HTTP client pauses between an answer's head
        and its body, which have usually come in one read) costs nothing.
      - C{resumeProducing}: only reading that was really stopped is started
        again. The server's HTTP channel resumes its connection after every
        answer, paused or not; Twisted's resume of a connection still reading
        goes through the reactor (four calls, about 50 bytecodes) to change
        nothing.

    @ivar _direct: whether a write may go to the socket at once: nothing is buffered, and the connection is
        connected and neither closing (C{loseConnection}), aborted, half-closed (C{loseWriteConnection}) nor TLS
        (C{startTLS}). A write that buffers clears it and the C{doWrite} that empties the buffer sets it again;
        each of those calls clears it for good (C{_shut}: Twisted changes those states nowhere else). So C{write}
        tests one attribute, not seven, and L{send_now} one (L{prompt} sets it from them when it makes the
        connection prompt).
    """

    _pause_pending = False
    _read_stopped = False  # stopReading ran since the last startReading (it starts reading when made)
    _direct = False
    _shut = False  # closed, closing, aborted, half-closed or TLS: never direct again

    def write(self, data):
        # (an empty write sends nothing either way)
        if not self._direct or len(data) > PROMPT_WRITE_LIMIT:
            super().write(data)
            self._direct = False  # (what it held waits for doWrite)
            return
        try:
            sent = self.socket.send(data)
        except OSError:
            sent = 0
        if sent < len(data):
            super().write(data[sent:] if sent else data)
            self._direct = False

    def doWrite(self):
        why = super().doWrite()
        if why is None and not (self._shut or self.dataBuffer or self._tempDataBuffer):
            self._direct = True  # (all it held was sent)
        return why

    def writeSequence(self, iovec):
        self.write(b"".join(iovec))

    def loseConnection(self, *args, **kwargs):
        self._direct, self._shut = False, True
        return super().loseConnection(*args, **kwargs)

    def loseWriteConnection(self):
        self._direct, self._shut = False, True  # (what is written after it is buffered, and sent before the half-close)
        return super().loseWriteConnection()

    def abortConnection(self):
        self._direct, self._shut = False, True
        return super().abortConnection()

    def startTLS(self, *args, **kwargs):
        self._direct, self._shut = False, True
        return super().startTLS(*args, **kwargs)

    def connectionLost(self, reason):
        self._direct, self._shut = False, True
        return super().connectionLost(reason)

    def pauseProducing(self):
        self._pause_pending = True

    def resumeProducing(self):
        if self._pause_pending:
            self._pause_pending = False  # still reading: nothing to undo
        elif self._read_stopped:
            super().resumeProducing()

    def startReading(self):
        self._read_stopped = False
        super().startReading()

    def stopReading(self):
        self._pause_pending = False
        self._read_stopped = True
        super().stopReading()

    def doRead(self):
        """Read what came and hand it to the protocol: C{tcp.Connection}'s C{doRead} and C{_dataReceived} in
        one frame (two calls more on every read)."""
        if self._pause_pending:  # paused: data waits in the kernel until resumeProducing
            self.stopReading()
            return None
        try:
            data = self.socket.recv(self.bufferSize)
        except OSError as se:
            if se.args[0] == errno.EWOULDBLOCK:
                return None
            return CONNECTION_LOST
        if not data:
            return CONNECTION_DONE
        self.protocol.dataReceived(data)
        return None


class _PromptServer(_Prompt, tcp.Server):
    pass


class _PromptClient(_Prompt, tcp.Client):
    pass


_PROMPT_CLASSES = {tcp.Server: _PromptServer, tcp.Client: _PromptClient}
_PROMPTS = frozenset(_PROMPT_CLASSES.values())


def prompt(transport):
    """Make C{transport}, when it is one of Twisted's plain TCP connections, a prompt one (L{_Prompt}), Nagle's
    algorithm off (C{TCP_NODELAY}).

    Called by a protocol's C{makeConnection}, before anything was written or
    paused. Other transports (TLS, UNIX sockets, test transports) are left
    as they are.

    Nagle's algorithm holds a small write while an earlier one is not acknowledged: a stream's event, one
    upstream read after the one before it, met the client's delayed ACK (about 40 ms on Linux) before it left
    (as the head did once, written on its own as the stream's producer was registered; it now leaves with the
    first events). The gateway writes what it has at once, a whole answer or an upstream
    read, so there is nothing for Nagle to gather.
    """
    cls = _PROMPT_CLASSES.get(transport.__class__)
    if cls is not None:
        transport.__class__ = cls
        # The class change left its attributes in a dict keyed as its old class shares them, which CPython 3.11's
        # specialized attribute reads cannot use (each of the many reads of it a request makes took the generic
        # path: about 200 instructions more); dict() copies them into one of its own (a copy() would stay shared).
        transport.__dict__ = dict(transport.__dict__)
        transport._shut = not transport.connected or bool(
            transport.disconnecting or transport._aborting or transport._writeDisconnected or transport.TLS)
        transport._direct = not (transport._shut or transport.dataBuffer or transport._tempDataBuffer)
        try:
            transport.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:  # (already reset: its first write meets that)
            pass


def dispatch_plainly(reactor) -> bool:
    """Make an epoll C{reactor} hand each event to its connection directly (L{_plain_poll}).

    Twisted's C{doPoll} calls each connection through C{log.callWithLogger}, which asks it for its log
    prefix and runs the call in a copy of the legacy log context ({"system": prefix}): about 120
    bytecodes per event, two or three events per relayed request, for the "system" field of legacy
    (C{twisted.python.log}) events logged meanwhile. The gateway logs with C{twisted.logger}, whose
    events name their own namespace; a legacy event logged while a connection handles an event (an
    error Twisted logs with C{log.err}) shows "-" as its system instead of the connection's prefix.

    @return: whether C{reactor} is an epoll reactor, and now dispatches plainly.
    """
    try:
        from twisted.internet.epollreactor import EPollReactor
    except ImportError:  # no epoll here (not Linux)
        return False
    if type(reactor).doIteration is not EPollReactor.doPoll:
        return False
    reactor.doIteration = MethodType(_plain_poll, reactor)
    return True


_EPOLLIN = getattr(select, "EPOLLIN", None)  # (bytes to read, and nothing else: None where there is no epoll)


def _plain_poll(self, timeout):
    """C{EPollReactor.doPoll}, each event handed to C{_doReadOrWrite} without the legacy log context (it
    logs what a connection raises, as C{callWithLogger} would); an event that is only bytes to read (most:
    each upstream read of a stream) has C{_doReadOrWrite}'s steps for it taken here, without its call and its
    tests for a disconnection and a write."""
    if timeout is None:
        timeout = -1  # wait until something happens
    try:
        events = self._poller.poll(timeout, len(self._selectables))
    except OSError as err:
        if err.errno == errno.EINTR:
            return
        raise
    selectables = self._selectables
    dispatch = self._doReadOrWrite
    for fd, event in events:
        selectable = selectables.get(fd)
        if selectable is None:
            continue
        if event != _EPOLLIN:
            try:
                dispatch(selectable, fd, event)
            except KeyboardInterrupt:
                raise
            except BaseException:
                log.err(None, "Unhandled error handling an event")
            continue
        # Bytes to read, nothing else (most events): C{_doReadOrWrite}'s steps for them, in this frame.
        in_read = False
        try:
            if selectable.fileno() == -1:
                why = _NO_FILEDESC
            else:
                why = selectable.doRead()
                in_read = True
        except BaseException:
            why = sys.exc_info()[1]
            log.err()
        if why:
            try:
                self._disconnectSelectable(selectable, why, in_read)
            except KeyboardInterrupt:
                raise
            except BaseException:
                log.err(None, "Unhandled error handling an event")
