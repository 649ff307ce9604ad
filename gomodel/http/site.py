"""The listening side: a Site whose requests enforce the body size limit while they read."""

import io
import os
import re

from twisted.logger import Logger
from twisted.python import failure
from twisted.web import http, resource, server


class _Discard(io.BytesIO):
    """A request body sink that keeps nothing (for bodies over the limit)."""

    def write(self, data):
        return len(data)


class GatewayRequest(server.Request):
    """A request that stops buffering its body once it passes the size limit.

    Twisted keeps whole bodies (in memory, or a temporary file past 100 kB)
    before a resource sees them; this stops that at C{body_limit} and flags
    the request so the front resource answers 413.
    """

    body_limit = 10 * 1024 * 1024
    too_large = False
    _received = 0
    # upload_sink(request, length) -> a sink for the body, or None: uploads
    # (POST /v1/files) are parsed while they arrive instead of being buffered.
    upload_sink = None
    streamed = False

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.request_id = None
        self.provider_name = None
        self.model = None
        self.usage = None

    def process(self):
        """Twisted's C{server.Request.process}, with our Server header, a Date
        formatted once a second, and the path split without unquoting when it
        has nothing to unquote."""
        self.site = site = self.channel.site
        headers = self.responseHeaders
        headers.setRawHeaders(b"server", [b"gomodel"])
        headers.setRawHeaders(b"date", [site.http_date()])
        self.prepath = []
        path = self.path
        segments = path[1:].split(b"/")
        self.postpath = list(map(http.unquote, segments)) if b"%" in path else segments
        if path == b"*":
            self._handleStar()
            return
        try:
            found = site.getResourceFor(self)
            if resource._IEncodingResource.providedBy(found):
                encoder = found.getEncoder(self)
                if encoder is not None:
                    self._encoder = encoder
            self.render(found)
        except BaseException:
            self.processingFailed(failure.Failure())

    def gotLength(self, length):
        # Only the request line and headers are known here: self.method and
        # self.uri are set later, the channel holds the request line meanwhile.
        sink = self.upload_sink(self, length) if self.upload_sink is not None else None
        if sink is not None:
            self.streamed = True
            self._parsePOSTFormSubmission = False  # never read the form into memory
            self.content = sink
            return
        if length is not None and length > self.body_limit:
            self.too_large = True
            self.content = _Discard()
            return
        super().gotLength(length)

    def handleContentChunk(self, data):
        if self.streamed:
            self.content.write(data)  # the sink applies its own limit
            return
        if self.too_large:
            return
        self._received += len(data)
        if self._received > self.body_limit:
            self.too_large = True
            self.content.close()
            self.content = _Discard()
            return
        super().handleContentChunk(data)


class GatewayChannel(http.HTTPChannel):
    """Twisted's HTTP/1.1 channel, with the connection's addresses looked up once.

    Twisted's Site wraps each channel in a protocol that can negotiate HTTP/2;
    the gateway speaks HTTP/1.1 only, so it serves this channel directly. Each
    request asks its channel for both addresses (a getsockname call and two
    address objects per request otherwise).
    """

    _peer = None
    _host = None

    def getPeer(self):
        if self._peer is None:
            self._peer = super().getPeer()
        return self._peer

    def getHost(self):
        if self._host is None:
            self._host = super().getHost()
        return self._host


CLIENT_IDLE_TIMEOUT = 120


class GatewaySite(server.Site):
    """Site for the gateway: our channel and request classes, and our own structured access log."""

    protocol = GatewayChannel

    def __init__(self, root, body_limit, upload_sink=None, **kwargs):
        request_class = type("GatewayRequest", (GatewayRequest,), {
            "body_limit": body_limit, "upload_sink": staticmethod(upload_sink) if upload_sink else None})
        # Idle keep-alive client connections are closed after this long (Twisted's
        # default is 12 hours); a request in progress is never cut by it.
        kwargs.setdefault("timeout", CLIENT_IDLE_TIMEOUT)
        # Form decoding is never needed here: it costs a MIME parse of every
        # POST's Content-Type and would read a whole multipart body into memory.
        kwargs.setdefault("parsePOSTFormSubmission", False)
        super().__init__(root, requestFactory=request_class, **kwargs)
        self._date = (None, b"")

    def http_date(self) -> bytes:
        """The Date header's value for now, formatted once per second."""
        now = int(self.reactor.seconds())
        if self._date[0] != now:
            self._date = (now, http.datetimeToString(now))
        return self._date[1]

    def log(self, request):
        """The front resource logs each request with its provider and model instead."""


_REQUEST_ID = re.compile(rb"[A-Za-z0-9._:\-]{1,128}")


def request_id_for(request) -> bytes:
    """The client's C{X-Request-Id} when it is sane, else a new one."""
    given = request.getHeader(b"x-request-id")
    if given is not None:
        given = given.encode("latin-1") if isinstance(given, str) else given
        if _REQUEST_ID.fullmatch(given):
            return given
    return os.urandom(16).hex().encode("ascii")


access_log = Logger(namespace="gomodel.access")
