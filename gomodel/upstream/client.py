"""The upstream HTTP client: one shared pool, and a relay client for every request to an upstream.

Requests skip treq and Agent (see L{RelayClient}): their per-request URL
parsing, header copies, cookie and content-decoding wrappers and producer
machinery cost measurable time on the hot path, and without gzip decoding
the upstream's bytes reach the client as they were. The gateway's own calls
(model lists, health probes, metrics scrapes) take the same way.
"""

import re

from twisted.internet.defer import CancelledError, Deferred, TimeoutError as DeferredTimeout
from twisted.internet.protocol import Protocol
from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.endpoints import HostnameEndpoint, TCP4ClientEndpoint, TCP6ClientEndpoint, wrapClientTLS
from twisted.web.client import URI, BrowserLikePolicyForHTTPS, ResponseDone
from twisted.web.http import PotentialDataLoss
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.web.iweb import IAgentEndpointFactory
from zope.interface import implementer

from gomodel._twistedcompat import PreparedRequest, QuietClientFactory, SweptPool, send_now, use_pool_factory


POOL_SWEEP = 0.5  # seconds between two sweeps of the pool's idle connections


def make_pool(reactor, max_per_host: int, idle_timeout: float) -> SweptPool:
    """One persistent pool for every upstream, sized for the expected concurrency.

    Idle connections are closed before uvicorn's 5 s keep-alive would close
    them under us: within C{idle_timeout} seconds, by the pool's C{close_idle}
    (L{gomodel._twistedcompat.SweptPool}), which the gateway calls every
    L{POOL_SWEEP} seconds. The pool's own retry wrapper is off: it only ever
    retries bodiless idempotent requests, and the providers retry a request
    that found its pooled connection closed themselves.
    """
    pool = SweptPool(reactor, persistent=True)
    pool.retryAutomatically = False
    pool.maxPersistentPerHost = max_per_host
    pool.cachedConnectionTimeout = idle_timeout
    use_pool_factory(pool, QuietClientFactory)
    return pool


@implementer(IAgentEndpointFactory)
class CachingEndpointFactory:
    """TCP (and TLS for https) endpoints, built once per upstream host rather than per request.

    An IP address (C{http://10.0.0.5:8000}, C{http://[fd00::5]:8000}) is connected to directly
    (L{tcp_endpoint}): Twisted's L{HostnameEndpoint} would look it up again on every new connection
    (a thread pool's C{getaddrinfo}, and a class made per call), about three times the CPU of the
    connection itself. A name is looked up on each new connection, so a changed DNS record is followed; each
    address a connection to it reached is told to those who asked (L{on_peer}).
    """

    def __init__(self, reactor, connect_timeout: float):
        self._reactor = reactor
        self._connect_timeout = connect_timeout
        self._policy = None  # built for the first https upstream
        self._endpoints = {}
        self._peers = {}  # host name (bytes, lower case) -> what to call with each address reached for it

    def on_peer(self, host: bytes, noted):
        """Call C{noted} with each address (text: C{10.0.0.5}, C{fd00::5}) a connection to the host name C{host}
        reached, the first time each does (an upstream's errors must not name it either); never for an IP
        address's host (connected to as it is)."""
        self._peers.setdefault(host.lower(), []).append(noted)

    def endpointForURI(self, uri):
        key = (uri.scheme, uri.host, uri.port)
        endpoint = self._endpoints.get(key)
        if endpoint is None:
            endpoint = tcp_endpoint(self._reactor, uri.host, uri.port, self._connect_timeout)
            if endpoint.__class__ is HostnameEndpoint:
                endpoint = _PeerNoting(endpoint, self._peers.setdefault(uri.host.lower(), []))
            if uri.scheme == b"https":
                if self._policy is None:
                    self._policy = BrowserLikePolicyForHTTPS()
                creator = self._policy.creatorForNetloc(uri.host, uri.port)
                endpoint = wrapClientTLS(creator, endpoint)
            self._endpoints[key] = endpoint
        return endpoint


@implementer(IStreamClientEndpoint)
class _PeerNoting:
    """A host name's endpoint (L{HostnameEndpoint}) that tells C{noted} (callables) each address its connections
    reach, once each (L{CachingEndpointFactory.on_peer}): a new connection's cost, none of a request's."""

    def __init__(self, endpoint, noted: list):
        self._endpoint = endpoint
        self._noted = noted
        self._seen = set()

    def connect(self, factory):
        """The endpoint's L{connect}: a Deferred firing with the protocol once connected, failing as it fails."""
        return self._endpoint.connect(factory).addCallback(self._connected)

    def _connected(self, protocol):
        transport = getattr(protocol, "transport", None)
        address = getattr(transport.getPeer(), "host", None) if transport is not None else None
        if address and address not in self._seen:
            self._seen.add(address)
            for noted in self._noted:
                noted(address)
        return protocol


def tcp_endpoint(reactor, host: bytes, port: int, timeout: float):
    """A TCP endpoint to C{host} (a URI's: C{::1} for C{http://[::1]:8000}) and C{port}: an IP address's
    straight to it, a name's through the reactor's resolver on each connection."""
    text = host.decode("ascii", "replace")
    if isIPAddress(text):
        return TCP4ClientEndpoint(reactor, text, port, timeout=timeout)
    if isIPv6Address(text):
        return TCP6ClientEndpoint(reactor, text, port, timeout=timeout)
    return HostnameEndpoint(reactor, host, port, timeout=timeout)


URLS_KEPT = 1000  # URLs (and methods) a RelayClient keeps checked
_VALID_METHOD = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_VALID_TARGET = re.compile(rb"/[\x21-\x7e]*")
_ORIGIN = re.compile(rb"(https?)://([^/?#]+)")


class _Origin:
    """Where the requests to one scheme://host:port go: pool key, endpoint, Host header line."""

    __slots__ = ("key", "endpoint", "host_line")

    def __init__(self, key, endpoint, host_line):
        self.key = key
        self.endpoint = endpoint
        self.host_line = host_line


class RelayClient:
    """Sends requests to upstreams (relayed ones, and the gateway's own) over the shared pool, one layer
    below Agent.

    Agent parses the URL, copies the headers and streams the body through a
    producer on every request. Here each origin (scheme, host, port) is parsed
    once, and a request's head and in-memory body are written in one call to
    a pooled L{HTTP11ClientProtocol}. The answer is the same L{IResponse}
    Agent gives, with the same failures (C{RequestNotSent},
    C{ResponseNeverReceived}, ...).
    """

    def __init__(self, pool, endpoints):
        self._pool = pool
        self._endpoints = endpoints
        self._origins = {}
        self._urls = {}  # url -> (its _Origin, its request target), checked: most come again and again
        self._methods = set()  # methods checked

    def request(self, method: bytes, url: bytes, header_lines: bytes, body) -> Deferred:
        """Send C{method url} with C{header_lines} and C{body} (bytes or None).

        @param header_lines: the request's headers as C{b"Name: value\\r\\n"}
            lines, without Host and Content-Length (added here); the caller
            vouches that they hold no CR or LF of their own.
        @return: Deferred firing with the L{IResponse}. Cancelling it closes
            the connection.
        """
        checked = self._urls.get(url)
        if checked is None:
            checked = self._check(url)
        origin, target = checked
        if method not in self._methods:
            self._check_method(method)
        if body is not None:
            length = b"Content-Length: %d\r\n" % len(body)
        elif method in (b"POST", b"PUT", b"PATCH"):
            length = b"Content-Length: 0\r\n"
        else:
            length = b""
        request = PreparedRequest(method, b"".join((method, b" ", target, b" HTTP/1.1\r\n", origin.host_line,
                                                    header_lines, length, b"\r\n", body or b"")))
        protocol = self._pool.cached(origin.key)
        if protocol is not None:
            return _send(protocol, request)
        return self._pool.getConnection(origin.key, origin.endpoint).addCallback(_send, request).addErrback(_fresh)

    def _check(self, url):
        """C{(origin, request target)} of C{url}, kept for its next request (three regular expressions
        a request otherwise: about 5,000 instructions).

        @raise ValueError: not an http(s) URL, or a target with a byte a request line cannot carry.
        """
        match = _ORIGIN.match(url)
        if match is None:
            raise ValueError(f"not an http(s) URL: {url!r}")
        origin = self._origins.get(match.group(0))
        if origin is None:
            origin = self._origin(match)
        target = url[match.end():] or b"/"
        if _VALID_TARGET.fullmatch(target) is None:
            raise ValueError(f"invalid request target: {target!r}")
        if len(self._urls) >= URLS_KEPT:  # query strings can make every URL new
            self._urls.clear()
        checked = self._urls[url] = (origin, target)
        return checked

    def _check_method(self, method):
        """@raise ValueError: C{method} is not an HTTP token."""
        if _VALID_METHOD.fullmatch(method) is None:
            raise ValueError(f"invalid method: {method!r}")
        if len(self._methods) < URLS_KEPT:
            self._methods.add(method)

    def _origin(self, match):
        uri = URI.fromBytes(match.group(0) + b"/")
        default_port = (uri.scheme, uri.port) in ((b"http", 80), (b"https", 443))
        host = b"[%s]" % uri.host if isIPv6Address(uri.host.decode("ascii", "replace")) else uri.host  # as Agent's
        host = host if default_port else b"%s:%d" % (host, uri.port)
        origin = _Origin((uri.scheme, uri.host, uri.port), self._endpoints.endpointForURI(uri),
                         b"Host: " + host + b"\r\n")
        self._origins[match.group(0)] = origin
        return origin


def _send(protocol, request):
    """Issue C{request} on a pooled connection and put its bytes on the wire at once."""
    answer = protocol.request(request)
    send_now(protocol.transport)
    return answer


def _fresh(failure):
    """Mark the failure of a request sent on a new connection (its C{fresh}): the upstream took the connection for
    it, so a lost answer is no stale pooled connection's (one the upstream closed as it was reused) and is never
    sent again on that ground (L{gomodel.upstream.openai_compatible.OpenAICompatibleProvider.send})."""
    failure.value.fresh = True
    return failure


class BodyTooLarge(Exception):
    """An upstream body went past the limit we read into memory."""


class BoundedCollector(Protocol):
    """Reads a body of at most C{limit} bytes; C{finished} fires with it (L{read_body})."""

    def __init__(self, finished: Deferred, limit: int):
        self._finished = finished
        self._limit = limit
        self._parts = []
        self._size = 0

    def dataReceived(self, data):
        if self._finished.called:
            return
        self._size += len(data)
        if self._size > self._limit:
            self.transport.stopProducing()
            self._finished.errback(BodyTooLarge(self._limit))
            return
        self._parts.append(data)

    def connectionLost(self, reason):
        if self._finished.called:
            return
        if reason.check(ResponseDone, PotentialDataLoss):
            self._finished.callback(b"".join(self._parts))
        else:
            self._finished.errback(reason)


def read_body(response, limit: int, collector=BoundedCollector) -> Deferred:
    """Read a whole upstream body of at most C{limit} bytes.

    @param collector: C{collector(finished, limit)}, the protocol that reads it: a L{BoundedCollector}.

    @return: Deferred firing with the bytes; failing with L{BodyTooLarge}, or
        with the upstream's failure (C{ResponseFailed}) when it broke off.
        Cancelling it closes the upstream connection.
    """
    protocol = None

    def cancel(d):
        if protocol is not None and protocol.transport is not None:
            protocol.transport.stopProducing()

    finished = Deferred(cancel)
    protocol = collector(finished, limit)
    response.deliverBody(protocol)
    return finished


def discard(response, limit: int = 1024 * 1024):
    """Read and drop an answer's body we do not relay, so its connection can go back to the pool.

    A body past C{limit} closes the connection instead; failures are ignored, and so is a body already read or
    being read (a 429's, looked at before it is relayed, whose reading the client's leaving cut short).
    """
    try:
        reading = read_body(response, limit)
    except RuntimeError:  # (Twisted's "cannot deliverBody again")
        return
    reading.addErrback(lambda _: None)


async def within(d: Deferred, seconds: float, clock):
    """Await C{d}, cancelled after C{seconds} on C{clock} (a reactor, or L{gomodel.timers.Timers}).

    @return: what C{d} fires with.
    @raise DeferredTimeout: C{seconds} passed first (its C{__cause__}: the failure cancelling C{d} gave, e.g. a
        request's C{ResponseNeverReceived} once it was sent). Unlike C{Deferred.addTimeout} this also recognises
        the C{ResponseNeverReceived([CancelledError])} that cancelling an Agent request produces.
    @raise Exception: what C{d} fails with.
    """
    # No closure (its cells and function are made on every call): the timer's own state says whether it
    # fired, which a clock marks before it calls (a DelayedCall is called, a Timers' timeout inactive).
    call = clock.callLater(seconds, d.cancel)
    try:
        return await d
    except Exception as e:
        if not call.active() and was_cancelled(e):
            raise DeferredTimeout(seconds) from e
        raise
    finally:
        if call.active():
            call.cancel()


def was_cancelled(exc) -> bool:
    """Whether C{exc} is, or wraps, a cancellation (as Agent's request failures do)."""
    if isinstance(exc, CancelledError):
        return True
    return any(r.check(CancelledError) for r in getattr(exc, "reasons", ()) or ())
