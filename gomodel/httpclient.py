"""The upstream HTTP client: one shared pool, an Agent for relayed requests, treq for our own calls.

Relayed requests go to the Agent directly: treq's per-request URL parsing,
cookie and content-decoding wrappers cost measurable time on the hot path,
and without gzip decoding the upstream's bytes reach the client as they were.
"""

from http.cookiejar import CookieJar, DefaultCookiePolicy

from treq.client import HTTPClient
from twisted.internet.defer import CancelledError, Deferred, TimeoutError as DeferredTimeout, succeed
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.web.client import Agent, BrowserLikePolicyForHTTPS, HTTPConnectionPool, ResponseDone, _HTTP11ClientFactory
from twisted.web.http import PotentialDataLoss
from twisted.web.iweb import IAgentEndpointFactory, IBodyProducer
from zope.interface import implementer


@implementer(IBodyProducer)
class BytesProducer:
    """A request body already in memory, written in one call (no cooperator round trip)."""

    def __init__(self, data: bytes):
        self._data = data
        self.length = len(data)

    def startProducing(self, consumer):
        consumer.write(self._data)
        return succeed(None)

    def pauseProducing(self):
        pass

    def resumeProducing(self):
        pass

    def stopProducing(self):
        pass


class _QuietClientFactory(_HTTP11ClientFactory):
    """The pool's connection factory, without a log line per connection opened and closed."""

    noisy = False


def make_pool(reactor, config) -> HTTPConnectionPool:
    """One persistent pool for every upstream, sized for the expected concurrency.

    Idle connections are closed before uvicorn's 5 s keep-alive would close
    them under us.
    """
    pool = HTTPConnectionPool(reactor, persistent=True)
    pool.maxPersistentPerHost = config.pool_max_per_host
    pool.cachedConnectionTimeout = config.pool_idle_timeout
    pool._factory = _QuietClientFactory
    return pool


@implementer(IAgentEndpointFactory)
class CachingEndpointFactory:
    """TCP (and TLS for https) endpoints, built once per upstream host rather than per request."""

    def __init__(self, reactor, connect_timeout: float):
        self._reactor = reactor
        self._connect_timeout = connect_timeout
        self._policy = None  # built for the first https upstream
        self._endpoints = {}

    def endpointForURI(self, uri):
        key = (uri.scheme, uri.host, uri.port)
        endpoint = self._endpoints.get(key)
        if endpoint is None:
            endpoint = HostnameEndpoint(self._reactor, uri.host, uri.port, timeout=self._connect_timeout)
            if uri.scheme == b"https":
                if self._policy is None:
                    self._policy = BrowserLikePolicyForHTTPS()
                creator = self._policy.creatorForNetloc(uri.host, uri.port)
                endpoint = wrapClientTLS(creator, endpoint)
            self._endpoints[key] = endpoint
        return endpoint


def make_agent(reactor, pool, connect_timeout: float) -> Agent:
    """The Agent every upstream request goes through (one pool, cached endpoints)."""
    return Agent.usingEndpointFactory(reactor, CachingEndpointFactory(reactor, connect_timeout), pool)


def make_http_client(agent) -> HTTPClient:
    """A treq client over C{agent} for the gateway's own calls; it keeps no cookies."""
    return HTTPClient(
        agent,
        cookiejar=CookieJar(DefaultCookiePolicy(allowed_domains=[])),
        data_to_body_producer=BytesProducer,
    )


class BodyTooLarge(Exception):
    """An upstream body went past the limit we read into memory."""


class _BoundedCollector(Protocol):
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


def read_body(response, limit: int) -> Deferred:
    """Read a whole upstream body of at most C{limit} bytes.

    @return: Deferred firing with the bytes; failing with L{BodyTooLarge}, or
        with the upstream's failure (C{ResponseFailed}) when it broke off.
        Cancelling it closes the upstream connection.
    """
    protocol = None

    def cancel(d):
        if protocol is not None and protocol.transport is not None:
            protocol.transport.stopProducing()

    finished = Deferred(cancel)
    protocol = _BoundedCollector(finished, limit)
    response.deliverBody(protocol)
    return finished


def deadline(d: Deferred, seconds: float, clock) -> Deferred:
    """C{d}, cancelled after C{seconds}; it then fails with L{DeferredTimeout}.

    Unlike C{Deferred.addTimeout} this also recognises the
    C{ResponseNeverReceived([CancelledError])} that cancelling an Agent
    request produces.
    """
    timed_out = []

    def expire():
        timed_out.append(True)
        d.cancel()

    call = clock.callLater(seconds, expire)

    def settled(result):
        if call.active():
            call.cancel()
        if timed_out and isinstance(result, Failure) and was_cancelled(result.value):
            raise DeferredTimeout(seconds)
        return result

    return d.addBoth(settled)


def was_cancelled(exc) -> bool:
    """Whether C{exc} is, or wraps, a cancellation (as Agent's request failures do)."""
    if isinstance(exc, CancelledError):
        return True
    return any(r.check(CancelledError) for r in getattr(exc, "reasons", ()) or ())
