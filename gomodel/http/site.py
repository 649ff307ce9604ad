"""The listening side: a Site whose requests are checked when their head is in, before any body is read.

When the request line and headers are in (C{gotLength}), the gateway key is
checked and the announced length compared with the limit; a refused request's
body is never stored (it is read and dropped, and its connection is not kept),
an upload's body goes to its sink as it arrives, and any other body is
buffered up to the limit.
"""

from io import BytesIO
import re
from functools import partial

from twisted.logger import Logger
from twisted.python import failure
from twisted.web import server
from twisted.web.resource import getChildForRequest
# Read once: twisted.web.http's attributes are read through a deprecation proxy (tens of steps a read).
from twisted.web.http import NO_BODY_CODES, Request as HTTPRequest, datetimeToString, parse_qs, unquote

from gomodel import _twistedcompat
from gomodel.errors import GatewayError, InternalError, MethodNotAllowed
from gomodel.http import render
from gomodel.http.channel import GatewayChannel
from gomodel.http.context import called
from gomodel.http.headers import (CONNECTION, CONTENT_LENGTH, CONTENT_TYPE, DATE, SERVER, TRANSFER_ENCODING,
                                   X_REQUEST_ID, AnswerHeaders)
from gomodel.ids import random_hex_bytes


class _Discard(BytesIO):
    """A request body sink that keeps nothing (for bodies over the limit)."""

    def write(self, data):
        return len(data)


_log = Logger()


def _nothing(data):
    pass


class IdentityPending(Exception):
    """Raised by a site's C{authenticate} that must ask before it can say who sent a request (a key made
    on another process, not yet in this one's key ring): C{identity} is a Deferred firing with who did,
    or failing with the L{GatewayError} to refuse the request with. The request's body is received
    meanwhile (dropped as soon as it is refused); the request is served once both are in."""

    def __init__(self, identity):
        super().__init__(identity)
        self.identity = identity


class GatewayRequest(_twistedcompat.EndingRequest):
    """A request checked when its head is in, whose body is kept only within limits.

    Twisted keeps whole bodies (in memory, or a temporary file past 100 kB)
    before a resource sees them. Here, once the headers are in, the site's
    C{authenticate} decides: a refused request (L{refusal}) and one announced
    larger than C{body_limit} (L{too_large}) have their bodies dropped as they
    arrive; an upload goes to the site's C{upload_sink}; anything else is
    buffered until it passes C{body_limit}.

    @ivar identity: who the site's authenticator says sent it (e.g.
        C{"master"}), or None.
    @ivar refusal: the L{gomodel.errors.GatewayError} to answer instead of
        the route, or None.
    @ivar context: the L{gomodel.http.context.RequestContext}, made by the front.
    @ivar keep_alive: whether the connection takes another request after this one (the channel sets it
        from the head; a refusal clears it).
    @ivar passthrough: a C{/p/} request's L{gomodel.api.passthrough.Endpoint}, read from its path once
        (L{gomodel.api.passthrough.endpoint_of}), or None.
    @ivar background: a background response's create (set by its route): a drain out of time waits a moment more
        for its answer (L{gomodel.lifecycle.BACKGROUND_GRACE}) rather than cut it, as its instance may run it
        already.
    """

    body_limit = 10 * 1024 * 1024
    limit_name = "BODY_SIZE_LIMIT"  # the setting that sets body_limit (the 413 names it)
    audio_limit = None  # (limit, its setting's name) of the audio routes' bodies (AUDIO_PATHS), or None
    too_large = False
    _received = 0
    chunks = 0  # the chunks of a chunked body read so far (GatewayChannel.on_chunk_header): their framing's count
    # authenticate(request, path) -> identity; raises GatewayError to refuse.
    authenticate = None
    # upload_sink(request, method, path, length) -> a sink for the body, or
    # None: uploads (POST /v1/files) are parsed while they arrive.
    upload_sink = None
    streamed = False
    identity = None
    refusal = None
    context = None
    passthrough = None
    background = False
    keep_alive = True
    # While who sent it is looked up (L{_await_identity}): the arguments of its C{requestReceived}, once its body is
    # in (L{held}); None otherwise.
    waiting = None
    _cookies_parsed = False
    answer_headers = AnswerHeaders

    def parseCookies(self):
        """Nothing: cookies are parsed when first asked for (L{getCookie}), not on every request (the gateway
        reads none)."""

    def getCookie(self, key):
        if not self._cookies_parsed:
            self._cookies_parsed = True
            super().parseCookies()
        return super().getCookie(key)

    # (L{write} takes C{last}: what L{gomodel.proxy.relay.StreamRelay} looks for)
    write_takes_last = True

    def write(self, data, last=False):
        """Twisted's C{write} (C{server.Request}'s, then C{http.Request}'s), its first write's header checks
        made on the header dict: Twisted asks for Content-Type and Content-Length twice, each name
        re-encoded. Anything but a plain first write (an encoder, a fake HEAD, cookies, an ETag or
        Last-Modified to add, a finished or lost request) is Twisted's.

        C{last}: C{data} is the whole body (a short stream's); a chunked one's end goes out in the same write,
        one send where Twisted's C{finish} sends it on its own (it then writes none). Twisted's writes leave
        that end to C{finish}.

        A stream's later writes (a chunk each, nothing else to decide: L{_framing}) are framed here: Twisted's
        two C{write}s cost about 45 bytecodes of checks a chunk, every upstream read of a stream."""
        if self.startedWriting:
            if self._framing and data:
                self.sentLength += len(data)
                self.channel.write(b"%x\r\n%b\r\n" % (len(data), data))  # (toChunk's, made one piece at once)
                return
            super().write(data)
            return
        if not self._plain_first:
            super().write(data)
            return
        self.startedWriting = 1
        headers = _twistedcompat.plain_headers(self.responseHeaders)
        code = self.code
        no_body = code in NO_BODY_CODES  # 204 and 304: neither a body nor a Content-Type
        length = headers.get(CONTENT_LENGTH)
        if (not no_body and CONTENT_TYPE not in headers and self.defaultContentType is not None
                and (length is None or length[0] != b"0")):
            headers[CONTENT_TYPE] = [self.defaultContentType]
        version = self.clientproto
        bodiless = no_body or self.method == b"HEAD"
        if version == b"HTTP/1.1" and length is None and not bodiless:
            headers[TRANSFER_ENCODING] = [b"chunked"]
            self.chunked = 1
        self.channel.writeHeaders(version, b"%d" % code, self.code_message, self.responseHeaders)
        if bodiless:
            self.write = _nothing  # as Twisted does: no body for a HEAD or a 204/304
            return
        self.sentLength += len(data)
        if self.chunked:  # (toChunk's framing, made one piece at once)
            if last and data:
                self.chunked = 0  # (its end is written: Twisted's finish writes a chunked answer's only)
                # (and the last chunk, empty, and the body's end without trailers: what Twisted's finish writes)
                self.channel.write(b"%x\r\n%b\r\n0\r\n\r\n" % (len(data), data))
                return
            self._framing = 1  # (the writes after it: chunks, L{_framing})
            if data:
                self.channel.write(b"%x\r\n%b\r\n" % (len(data), data))
        elif data:
            self.channel.write(data)

    # Whether its site logs it when it finishes (C{log}: L{GatewaySite}'s does nothing, the request's context logs it).
    site_logs = True
    # Whether the first write has nothing of Twisted's to decide: no encoder (L{_twistedcompat.render_found} clears it),
    # no faked HEAD (L{_inFakeHead}), no cookie, ETag or Last-Modified to add (L{addCookie}, L{setETag},
    # L{setLastModified}), neither finished nor lost (L{finish}, L{connectionLost}). One flag read where the first
    # write would look at seven attributes.
    _plain_first = 1
    _fake_head = False

    @property
    def _inFakeHead(self):
        """Twisted's: whether a HEAD is answered as a GET whose body is dropped (C{server.Request.render} sets it)."""
        return self._fake_head

    @_inFakeHead.setter
    def _inFakeHead(self, value):
        self._fake_head = value
        if value:
            self._plain_first = 0

    def addCookie(self, *args, **kwargs):
        self._plain_first = 0
        return super().addCookie(*args, **kwargs)

    def setETag(self, etag):
        self._plain_first = 0
        return super().setETag(etag)

    def setLastModified(self, when):
        self._plain_first = 0
        return super().setLastModified(when)

    # Whether a write is a chunk to frame and send, nothing else to decide: the answer went out chunked, without an
    # encoder or a fake HEAD (set by the first write, but a last one), and is neither finished nor lost (cleared by
    # finish and by connectionLost).
    _framing = 0

    def connectionLost(self, reason):
        self._framing = self._plain_first = 0  # (lost: a write after it is Twisted's, which drops it)
        super().connectionLost(reason)

    def finish(self):
        """Twisted's C{finish} (C{server.Request}'s, then C{http.Request}'s) for an answer whose head went out, not
        chunked, without an encoder, on a site that does not log it (L{site_logs}): marked finished and cleaned up,
        without their steps for the other cases. Any other is Twisted's."""
        if self.chunked or not self.startedWriting or not self._plain_first or self.queued or self.site_logs:
            self._framing = self._plain_first = 0  # (finished: a write after it is Twisted's, which refuses it)
            super().finish()
            return
        self.finished = 1
        self._plain_first = 0
        self._cleanup()

    def process(self):
        """Twisted's C{server.Request.process}, with our Server header, a Date
        formatted once a second, and the path split without unquoting when it
        has nothing to unquote."""
        self.site = site = self.channel.site
        plain = _twistedcompat.plain_headers(self.responseHeaders)  # (AnswerHeaders.put's, without its two calls)
        plain[SERVER] = [b"gomodel"]
        plain[DATE] = [site.http_date()]
        self.prepath = []
        path = self.path
        segments = path[1:].split(b"/")
        # path.find, not `in`: see gomodel.proxy.sse.mentions
        self.postpath = list(map(unquote, segments)) if path.find(b"%") >= 0 else segments
        if path == b"*":  # (no route's: its request id and record are the site's)
            star = self.method == b"OPTIONS"
            request_id = site.answered_early(self, path, 200 if star else 405, None if star else MethodNotAllowed.code)
            self.responseHeaders.put(X_REQUEST_ID, request_id)
            if star:
                _twistedcompat.handle_star(self)
            else:
                self._not_star()
            return
        try:
            _twistedcompat.render_found(self, site.getResourceFor(self))
        except BaseException:
            self.processingFailed(failure.Failure())

    def _not_star(self):
        """Answer a request for C{*} that is no C{OPTIONS} (the one method that target is for: RFC 9110 9.3.7)
        with a 405 in OpenAI's envelope, as any route answers a method it does not take."""
        body = render.render(self, MethodNotAllowed(
            f"Method {self.method.decode('ascii', 'replace')} is not allowed on * (allowed: OPTIONS).",
            headers={"Allow": "OPTIONS"}))
        self.write(body)
        self.finish()

    def gotLength(self, length):
        # Only the request line and headers are known here (the channel set self.method and self.uri).
        method = self.method
        path = self.uri.split(b"?", 1)[0]
        if path.find(b"%") >= 0:  # the path the routes see (L{process}): /%61dmin/ is /admin/
            path = unquote(path)
        if self.authenticate is not None:
            try:
                self.identity = self.authenticate(self, path)
            except GatewayError as e:
                self._refuse(e)
                return
            except IdentityPending as pending:
                self._await_identity(pending.identity)
                if self.refusal is not None:  # (decided at once)
                    return
        sink = self.upload_sink(self, method, path, length) if self.upload_sink is not None else None
        if sink is not None:
            self.streamed = True
            self._parsePOSTFormSubmission = False  # never read the form into memory
            self.content = sink
            return
        if length is None or length > self.body_limit:  # (a body within BODY_SIZE_LIMIT is within the audio one)
            if self.audio_limit is not None and path.endswith(AUDIO_PATHS):
                self.body_limit, self.limit_name = self.audio_limit
            if length is not None and length > self.body_limit:
                self.too_large = True
                self.content = _Discard()
                self.requestHeaders.removeHeader(b"expect")  # as L{_refuse}: no "100 Continue" for it
                self.close_after()
                return
        # twisted.web.http's, as server.Request's comes to for a site without getContentFile (it looks
        # that up, and makes and drops an AttributeError for every request); a body it keeps in memory made
        # here, without its two frames (twisted.web.http's _getContentFile: a test checks the limit)
        if length is not None and length < IN_MEMORY_BODY:
            self.content = BytesIO()  # (a name of its own: CPython 3.11 specializes no read of the io module's)
        else:
            HTTPRequest.gotLength(self, length)

    def _await_identity(self, identity):
        """Hold the request, once its body is in, until C{identity} (a Deferred) says who sent it, or a drain out of
        time gives up on it (L{give_up})."""
        self.waiting = held = []
        self.requestReceived = lambda *args: held.append(args)  # (an attribute: other requests pay nothing)
        identity.addBoth(self._decided)

    def _decided(self, result):
        """Serve the request held by L{_await_identity} as sent by C{result}'s principal, or refuse it with
        C{result}'s L{GatewayError}; nothing once it was decided (L{give_up})."""
        held = self.waiting
        if held is None:
            return
        self.waiting = None
        del self.requestReceived
        if isinstance(result, failure.Failure):
            if not result.check(GatewayError):
                _log.failure("deciding who sent a request failed", result)
                result = failure.Failure(InternalError("The gateway could not check the API key."))
            if self.streamed:  # an upload refused while it comes: its contents are dropped now, and what
                self._received, self.streamed = self.content.tell(), False  # comes is a dropped body's
                self.content.close()
            self._refuse(result.value)
        else:
            self.identity = result
        if held and not self._disconnected:
            self.requestReceived(*held[0])

    @property
    def held(self) -> bool:
        """Whether the request is read whole and waits for who sent it (L{_await_identity}): in flight, though no
        route has seen it yet."""
        return bool(self.waiting)

    def give_up(self, error):
        """Refuse with C{error}, now, the request L{held} for who sent it (a drain out of time: its answer, in its
        route's dialect, closes its connection); what the look-up says later is dropped."""
        self._decided(failure.Failure(error))

    def refuse_queued(self, error):
        """Answer C{error} when its turn comes instead of serving it (a request read whole behind the answer in
        progress, pipelined, that a drain out of time cuts: its answer, in its route's dialect, closes its
        connection); a key still looked up for it is no longer awaited."""
        if self.waiting is not None:
            self.give_up(error)
        else:
            self._refuse(error)

    def _refuse(self, error):
        """Answer C{error} once the request is in (at once where its client waits to be invited: the channel's
        C{_answer_unread}); drop its body, do not invite it, close after."""
        self.refusal = error
        self.content = _Discard()
        # No "100 Continue" for a body we will not read: a client that waits
        # for it gets the refusal instead of sending the body first (the channel answers a request whose
        # expectation gotLength dropped without reading its body).
        self.requestHeaders.removeHeader(b"expect")
        self.close_after()

    def close_after(self):
        """Make this the last request its connection takes, and say so in the answer (C{Connection: close}),
        so that a client's pool does not send its next request on this connection."""
        self.keep_alive = False
        self.responseHeaders.put(CONNECTION, b"close")

    def handleContentChunk(self, data):
        if self.streamed:
            self.content.write(data)  # the sink applies its own limit
            return
        self._received += len(data)  # also a dropped body's: its deadline counts it (GatewaySite.sweep_idle)
        if self.too_large or self.refusal is not None:
            return
        if self._received > self.body_limit:  # (a chunked body's: no length to refuse at its head)
            self.too_large = True
            self.content.close()
            self.content = _Discard()
            self.close_after()  # (answered at once: GatewayChannel.on_body)
            return
        self.content.write(data)  # what Twisted's handleContentChunk does

    def requestReceived(self, command, path, version):
        """Twisted's C{requestReceived} without its form decoding, which the gateway turns off
        (C{parsePOSTFormSubmission}): it still looked up the request's Content-Type each time."""
        if self._parsePOSTFormSubmission:
            super().requestReceived(command, path, version)
            return
        self.content.seek(0, 0)
        self.method, self.uri, self.clientproto = command, path, version
        self.path, mark, arguments = path.partition(b"?")
        self.args = parse_qs(arguments, 1) if mark else {}
        self.process()


# The announced length below which Twisted keeps a request's body in memory (a BytesIO; a temporary file at and
# past it, or for a chunked body): twisted.web.http's _getContentFile's.
IN_MEMORY_BODY = 100000
# The paths (their ends: /v1/audio/..., a passthrough's /p/{provider}/.../audio/...) whose bodies the site's
# audio_limit bounds: an audio file OpenAI takes (25 MB) is past BODY_SIZE_LIMIT's default.
AUDIO_PATHS = (b"/audio/transcriptions", b"/audio/translations")
CLIENT_IDLE_TIMEOUT = 120
# Seconds a request's head (its request line and headers) may take to arrive, as nginx's
# client_header_timeout (60 s) and Go's ReadHeaderTimeout bound it: a client that trickles a
# header a byte at a time would otherwise hold its connection for ever (it is never idle).
HEAD_TIMEOUT = 60
# A request's body may take BODY_TIMEOUT seconds plus one for every BODY_MIN_RATE bytes received, as Apache's
# mod_reqtimeout bounds it (body=20,MinRate=500): a body trickled a byte at a time is cut after about a minute
# (timing only the gap between two reads, as nginx's client_body_timeout does, would never cut it), and an upload
# of any size that averages 500 bytes a second (4 kbit/s) is never cut. As mod_reqtimeout counts the bytes read
# from the connection, a chunked body's framing counts too (CHUNK_FRAMING bytes a chunk: a client sending tiny
# chunks is progressing); and the time the gateway itself stops reading the body (an upload's disk lags:
# GatewayChannel.pause_reading) is not counted, since the client cannot send then.
BODY_TIMEOUT = 60
BODY_MIN_RATE = 500
IDLE_SWEEP = 5  # seconds between two sweeps of idle client connections
# Seconds a connection closing lingering (GatewayChannel._linger: bytes of its client's left unread) may go on
# reading and dropping what its client sends, as nginx's lingering_time (30 s); one sweep's interval without a
# byte ends it sooner (nginx's lingering_timeout, 5 s).
LINGER_TIME = 30


class GatewaySite(server.Site):
    """Site for the gateway: our channel and request classes, and our own structured access log.

    Idle keep-alive client connections are closed after C{idle_timeout} seconds
    (Twisted's default is 12 hours) by L{sweep_idle}, which the gateway calls
    every L{IDLE_SWEEP} seconds: Twisted's own idle timeout is one timer per
    connection, cancelled when each request comes in and made anew when it is
    done, two timer operations per request.
    """

    protocol = GatewayChannel

    def __init__(self, root, body_limit, *, authenticate=None, upload_sink=None, idle_timeout=CLIENT_IDLE_TIMEOUT,
                 head_timeout=HEAD_TIMEOUT, body_timeout=BODY_TIMEOUT, body_min_rate=BODY_MIN_RATE,
                 linger_time=LINGER_TIME, early=None, audio_limit=None, dialect=None, **kwargs):
        """
        @param dialect: C{dialect(request)}, the error dialect of a request's route (its C{path}), or None:
            OpenAI's (L{early_body}).
        @param audio_limit: the most bytes the body of a request to an audio route (L{AUDIO_PATHS}) may have,
            in place of C{body_limit} (C{AUDIO_BODY_SIZE_LIMIT}), or None: C{body_limit}.
        @param early: C{early(request_id, method, path, status, code)}, given each request answered before any
            route saw it (L{answered_early}), or None.
        @param authenticate: C{authenticate(request, path) -> identity}, called
            when a request's head is in; it raises a
            L{gomodel.errors.GatewayError} to refuse the request.
        @param upload_sink: C{upload_sink(request, method, path, length)} ->
            a file-like sink for an upload's body, or None.
        @param idle_timeout: seconds after which L{sweep_idle} closes a connection that has no request
            in progress and received nothing (a request in progress is never cut by it, nor a connection the
            gateway holds back: C{GatewayChannel.pause_reading}).
        @param head_timeout: seconds after which L{sweep_idle} answers 408 and closes a connection whose
            request's head is still arriving (counted from the first sweep that saw it arriving).
        @param body_timeout: seconds of grace for a request's body (counted from the first sweep that saw it
            arriving); past them and C{body_min_rate}'s due, L{sweep_idle} answers 408 and closes.
        @param body_min_rate: bytes a second a body must average: each adds C{1 / body_min_rate} seconds to
            C{body_timeout} (a chunked body's framing counted; the time the gateway pauses reading it not).
        @param linger_time: seconds after which L{sweep_idle} ends a connection closing lingering
            (C{GatewayChannel._linger}); one that received nothing since the sweep before ends sooner.
        """
        request_class = type("GatewayRequest", (GatewayRequest,), {
            "body_limit": body_limit,
            "audio_limit": None if audio_limit is None else (audio_limit, "AUDIO_BODY_SIZE_LIMIT"),
            "authenticate": staticmethod(called(authenticate)) if authenticate else None,  # (a bound __call__)
            "upload_sink": staticmethod(upload_sink) if upload_sink else None,
            "site_logs": type(self).log is not GatewaySite.log})
        kwargs["timeout"] = None  # no timer per connection: sweep_idle
        # Form decoding is never needed here: it costs a MIME parse of every
        # POST's Content-Type and would read a whole multipart body into memory.
        kwargs.setdefault("parsePOSTFormSubmission", False)
        super().__init__(root, requestFactory=request_class, **kwargs)
        self._date = (None, b"")
        self.channels = set()  # the open client connections (GatewayChannel keeps it)
        self.idle_timeout = idle_timeout
        self.head_timeout = head_timeout
        self.body_timeout = body_timeout
        self.body_min_rate = body_min_rate
        self.linger_time = linger_time
        self._early = early
        self._dialect = dialect

    def answered_early(self, request, target, status: int, code=None) -> bytes:
        """A request answered before any route saw it: its connection refused it (L{GatewayChannel}: no valid
        HTTP/1.1, a head past the limits, a 408), or it was for C{*}. Return its request id (the client's
        C{X-Request-Id} where its head brought a sane one, else a new one), and give its record to C{early} (the
        front's: access log, metrics).

        @param request: the request whose head or body was being read, or None (bytes that began none).
        @param target: what came of its target (bytes), its path shown up to L{EARLY_PATH} bytes.
        @param code: the error code of a refusal, or None.
        """
        request_id = request_id_for(request) if request is not None else random_hex_bytes()
        if self._early is not None:
            method = request.method if request is not None and request.method is not HTTPRequest.method else b"-"
            path = target.partition(b"?")[0][:EARLY_PATH] if request is not None else b""
            self._early(request_id, method, path or b"-", status, code)
        return request_id

    def early_body(self, request, target, error) -> tuple:
        """C{(body, anthropic)}: C{error}, which the connection answers C{request} with itself (L{answered_early}),
        in the error dialect of the route its C{target} names (C{dialect}: Anthropic's on C{/v1/messages}; before,
        OpenAI's on every route), and whether that is Anthropic's (its answer carries C{request-id} too)."""
        dialect = None
        if self._dialect is not None and request is not None:
            request.path = target.partition(b"?")[0]  # (what the dialect reads: a request no route will see)
            dialect = self._dialect(request)
        dialect = dialect or render.OPENAI
        return dialect.body(error), dialect is render.ANTHROPIC

    def lost_early(self, request, target, status, code=None):
        """Record C{request}, its head whole and its body arriving (no route saw it), whose connection was lost:
        its client left (C{status} 499, no C{code}: before, it was in no series and had no access line) or the
        gateway cut it (a drain out of time: C{code}); under its route (the front's C{answered_early})."""
        if self._early is not None:
            self._early(request_id_for(request), request.method, target.partition(b"?")[0][:EARLY_PATH], status,
                        code, routed=True, principal=request.identity)

    def sweep_idle(self):
        """Close the client connections idle for C{idle_timeout} seconds or more, as Twisted's idle timeout
        does (C{timeoutConnection}: closed, aborted if the client does not let go); a connection counts as
        idle from the first sweep that finds it without a request in progress and with nothing received
        since the sweep before.

        A request being read is timed from the first sweep that saw its head, then its body, arriving with
        no answer in progress (the sweep keeps which request and part that was: the request path pays
        nothing for it; what arrives during an answer is held, not read, and not timed). Its head may take
        C{head_timeout} seconds; its body C{body_timeout} seconds plus one for every C{body_min_rate} bytes
        received (with a chunked body's framing: L{_body_received}). Past that it is answered 408 and its
        connection closed. A request read whole is never cut.

        The time the gateway itself held the client back while its body was read (the channel's
        C{pause_reading}: an upload's disk lags) is not the client's: the sweep moves the body's start on by
        it (the channel keeps it at pause and resume; the request path pays nothing), and a connection held
        back is not idle either. The channel's own pause while an answer is in progress needs no such care:
        a body held behind an answer is not timed.

        A connection closing lingering (the channel's C{_linger}) is ended (aborted) once it has lingered
        C{linger_time} seconds, or when nothing arrived since the sweep before; its time starts once its
        answers have left (while its client reads them; one that reads none of them for C{idle_timeout} seconds
        is ended as an idle one)."""
        now = self.reactor.seconds()
        for channel in list(self.channels):
            since = channel.lingering_since
            if since is not None:  # (closing: it reads only to drop)
                left = _twistedcompat.unsent(channel.transport)
                if left:  # its answers are still leaving: it lingers once they left (but its client reads none)
                    if left != channel.unsent:
                        channel.lingering_since = now
                    elif now - since >= self.idle_timeout:
                        channel.transport.abortConnection()
                elif not channel.active or now - since >= self.linger_time:
                    channel.transport.abortConnection()
                channel.active = False
                channel.unsent = left
                continue
            receiving = channel._receiving
            if receiving is None:
                channel.watched = None  # (its body may be large: not kept past its reading)
            elif (channel._handlingRequest or channel.watched is not receiving
                  or channel.watched_head != channel._head_open):
                channel.watched, channel.watched_head, channel.watched_since = receiving, channel._head_open, now
                if channel.held_for or channel.held_since is not None:
                    channel.take_held(now)  # a hold before this watch is not in its time either
            elif channel._head_open:
                if now - channel.watched_since >= self.head_timeout:
                    channel.head_timed_out()
                    continue
            else:
                if channel.held_for or channel.held_since is not None:
                    channel.watched_since += channel.take_held(now)  # the gateway's hold is not the client's time
                if now - channel.watched_since >= self.body_timeout + _body_received(receiving) / self.body_min_rate:
                    channel.body_timed_out()
                    continue
            # (a connection the gateway holds back is not idle: the client cannot send; nor is one whose client
            # is still reading an answer that was written whole: what it holds to send went down since the sweep
            # before. One whose client reads nothing of it any more is, and is closed as any idle one)
            left = _twistedcompat.unsent(channel.transport)
            if (channel.active or channel._handlingRequest or channel.held_since is not None
                    or channel.idle_since is None or (left and left != channel.unsent)):
                channel.active = False
                channel.idle_since = now
            elif now - channel.idle_since >= self.idle_timeout:
                channel.timeoutConnection()
            channel.unsent = left

    def close_after_answers(self):
        """Make every open connection close after its answer in progress, or after its next request's
        (a drain): each such answer says so (C{Connection: close}), so that a client's pool or a load
        balancer sends no more requests on it."""
        for channel in list(self.channels):
            if channel.requests:
                channel.requests[-1].close_after()  # (a pipelined request after it is not taken)
            channel.requestFactory = partial(_last_request, channel.requestFactory)

    def close_idle(self):
        """Close every open connection without a request in progress (the end of a drain): a request sent on
        one from now on would be served while the services stop, or cut by the reactor's; it is not read (its
        client's pool opens a connection elsewhere). One whose request's head is still arriving (part of its
        request line or headers) is closed too; before, it was left open, and the rest, sent as the services
        stopped, was served then. (A request whose head is whole, its body arriving or read whole and waiting for
        who sent it, is in flight: the drain waited for it, L{gomodel.lifecycle.Drain}.)"""
        for channel in list(self.channels):
            if channel.transport is not None and all(request.context is None for request in channel.requests):
                channel.loseConnection()

    def abort_connections(self, spare=()):
        """Close every client connection at once (the end of a drain), but those in C{spare}: closing after
        what they were just told (a drain's 503, a stream's error event: L{gomodel.lifecycle}), which an
        abort would drop."""
        for channel in list(self.channels):
            if channel.transport is not None and channel not in spare:
                channel.transport.abortConnection()

    def getResourceFor(self, request):
        """Twisted's: the request's C{sitepath} a copy of its C{prepath}, and the resource its C{postpath} leads to
        from the root; the list copied by a slice (C{copy.copy} looks its copier up in Python), a leaf root (the
        front: L{gomodel.http.front.FrontResource}) taken at once."""
        request.site = self
        request.sitepath = request.prepath[:]
        root = self.resource
        return root if root.isLeaf else getChildForRequest(root, request)

    def http_date(self) -> bytes:
        """The Date header's value for now, formatted once per second."""
        now = int(self.reactor.seconds())
        if self._date[0] != now:
            self._date = (now, datetimeToString(now))
        return self._date[1]

    def log(self, request):
        """Each request's context logs it when it completes (L{gomodel.http.context.AccessLog})."""


# The bytes of an early answered request's path its record shows (L{GatewaySite.answered_early}: a 414's is up to
# 16 kB).
EARLY_PATH = 256
# The framing bytes a chunk takes at least: one hex digit and two CRLFs (C{1\r\nx\r\n}; the last: C{0\r\n\r\n}).
CHUNK_FRAMING = 5


def _last_request(factory, channel):
    """A request made by C{factory} for C{channel}, the last its connection takes (L{GatewaySite.close_after_answers})."""
    request = factory(channel)
    request.close_after()
    return request


def _body_received(request) -> int:
    """The bytes of C{request}'s body received so far: its upload sink's count (a file's position), or
    the count kept for the body limit (a refused or too large body's too); and for a chunked body, its chunks'
    framing, L{CHUNK_FRAMING} bytes a chunk: exact for a chunk under 16 bytes (tiny chunks are where framing
    matters), short by a hex digit or more for a larger one (under a tenth of its size), and not counting chunk
    extensions or trailers (llhttp says a chunk began, not how long its header was)."""
    received = request.content.tell() if request.streamed else request._received
    return received + CHUNK_FRAMING * request.chunks


_REQUEST_ID = re.compile(rb"[A-Za-z0-9._:\-]{1,128}")


def request_id_for(request) -> bytes:
    """The client's C{X-Request-Id} when it is sane, else a new one (L{gomodel.ids.random_hex_bytes})."""
    given = _twistedcompat.plain_headers(request.requestHeaders).get(X_REQUEST_ID)  # (request_header's look-up, inline)
    if given:
        given = given[-1]
        if _REQUEST_ID.fullmatch(given):
            return given
    return random_hex_bytes()

