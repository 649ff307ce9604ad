"""Forwarding one request to a provider and relaying its answer to the client."""

from twisted.internet.defer import CancelledError, TimeoutError as DeferredTimeout
from twisted.logger import Logger

from gomodel.errors import BadUpstreamResponse, StreamFailed, UpstreamTimeout
from gomodel.http.headers import copy_response_headers, is_event_stream
from gomodel.upstream.client import BodyTooLarge, deadline, read_body
from gomodel.proxy.relay import ClientStalled, StreamRelay, StreamTooLong, UpstreamIdle
from gomodel.proxy.sse import StreamIncomplete
from gomodel.upstream.errors import upstream_error

ERROR_BODY_LIMIT = 1024 * 1024
RESPONSE_BODY_LIMIT = 256 * 1024 * 1024
ABORT_GRACE = 10.0  # seconds a broken stream's error event gets to reach the client


class Forwarder:
    """Sends a request upstream and relays the answer: JSON byte for byte, streams with backpressure."""

    log = Logger()

    def __init__(self, clock, timeouts):
        self._clock = clock
        self._timeouts = timeouts

    async def forward(self, request, provider, path: str, payload: bytes, observer=None, transform=None):
        """Relay the answer of C{provider} to C{POST path} onto C{request}.

        See L{answer} for C{observer}, C{transform} and what this returns.
        """
        upstream = await provider.send("POST", path, payload, request.request_id)
        return await self.answer(request, provider, upstream, observer, transform)

    async def answer(self, request, provider, upstream, observer=None, transform=None):
        """Relay an upstream answer (a 2xx) onto C{request}; raise the envelope for anything else.

        @param observer: for event streams, an object with C{feed(bytes) ->
            bytes} and C{finish()} (see L{gomodel.proxy.sse}); None relays
            the bytes as they come.
        @param transform: for whole bodies, a function of the body's bytes
            returning the bytes to send (None sends them untouched).
        @return: the non-streaming body to write, or None once a stream was
            relayed (or broke off and the client connection was aborted).
        @raise GatewayError: before anything was sent to the client.
        """
        if upstream.code >= 400:
            raise await self.error_from(provider, upstream)
        if not 200 <= upstream.code < 300:
            _discard(upstream)
            raise BadUpstreamResponse(
                f"The upstream provider '{provider.name}' answered HTTP {upstream.code}.")
        if is_event_stream(upstream):
            return await self.relay_stream(request, upstream, observer)
        body = await self.relay_body(request, provider, upstream)
        if transform is not None:
            try:
                body = transform(body)
            except (ValueError, KeyError, TypeError, AttributeError):
                raise BadUpstreamResponse(
                    f"The answer of the upstream provider '{provider.name}' could not be read.") from None
            request.setHeader(b"content-type", b"application/json")
            request.setHeader(b"content-length", b"%d" % len(body))
        return body

    async def error_from(self, provider, upstream):
        """The L{gomodel.errors.UpstreamError} for an upstream answer with status >= 400."""
        try:
            body = await read_body(upstream, ERROR_BODY_LIMIT)
        except CancelledError:
            raise
        except Exception:
            body = b""
        return upstream_error(upstream.code, body, provider.name, provider.hidden)

    async def relay_body(self, request, provider, upstream):
        """Read a whole (non-streaming) upstream body and return it for the client, untouched."""
        reading = deadline(read_body(upstream, RESPONSE_BODY_LIMIT), self._timeouts.response_header, self._clock)
        try:
            body = await reading
        except CancelledError:
            raise
        except BodyTooLarge:
            raise BadUpstreamResponse(f"The answer of '{provider.name}' is too large to relay.") from None
        except DeferredTimeout:
            raise UpstreamTimeout(f"The upstream provider '{provider.name}' stopped sending its answer.") from None
        except Exception:
            raise BadUpstreamResponse(
                f"The upstream provider '{provider.name}' broke off its answer.") from None
        copy_response_headers(upstream, request)
        request.setHeader(b"content-length", b"%d" % len(body))
        return body

    async def relay_stream(self, request, upstream, observer=None, error_event=True, keep_length=False):
        """Relay an upstream body with flow control as it comes; return None when done.

        A stream that breaks after its headers went out is never made to look
        finished: the client gets an in-band SSE error event (unless
        C{error_event} is false: not an event stream), then a connection
        closed without the body's end. C{keep_length} keeps the upstream's
        Content-Length (the bytes pass unchanged).
        """
        copy_response_headers(upstream, request, keep_length)
        if is_event_stream(upstream):
            request.setHeader(b"cache-control", b"no-cache")
            request.setHeader(b"x-accel-buffering", b"no")  # no buffering in a proxy in front of us
        t = self._timeouts
        relay = StreamRelay(request, self._clock, observer, idle_timeout=t.stream_idle,
                            stall_timeout=t.client_stall, max_duration=t.stream_max)
        request_closed = request.notifyFinish()
        request_closed.addErrback(lambda _: None)
        try:
            request.registerProducer(relay, True)
        except AttributeError:
            # The client left before we could start: its channel is gone.
            upstream.deliverBody(relay)
            relay.stopProducing()
            return None
        upstream.deliverBody(relay)
        if relay.paused and relay.transport is not None:
            # deliverBody resumed the transport after its first delivery.
            relay.transport.pauseProducing()
        try:
            await relay.finished
        except CancelledError:
            raise
        except Exception as e:
            abort = self._broken(request, e, error_event)
            await request_closed
            if abort is not None and abort.active():
                abort.cancel()
            return None
        finally:
            request.usage = getattr(relay.observer, "usage", None)
        if request.channel is not None:
            request.unregisterProducer()
        return None

    def _broken(self, request, reason, error_event=True):
        """End a stream that broke after its headers: in-band error event, then no clean end.

        @return: the delayed call that aborts the connection if closing it
            cleanly takes too long, or None.
        """
        if isinstance(reason, ClientStalled):
            why = "the client stopped reading"
        elif isinstance(reason, UpstreamIdle):
            why = "the upstream sent nothing for too long"
        elif isinstance(reason, StreamTooLong):
            why = "the stream ran past its maximum duration"
        elif isinstance(reason, StreamIncomplete):
            why = str(reason)
        else:
            why = "the upstream connection broke off"
        self.log.warn("stream {request_id} ended abnormally: {why}",
                      request_id=request.request_id.decode(), why=why)
        if request.channel is None:
            return None
        request.unregisterProducer()
        transport = request.transport
        if isinstance(reason, ClientStalled):
            transport.abortConnection()
            return None
        if error_event:
            error = StreamFailed(f"The stream ended abnormally: {why}.")
            request.write(b"data: " + error.body() + b"\n\n")
        # Closing the socket without the chunked body's last chunk: the client
        # reads the error event, then an incomplete body, never a clean end.
        transport.loseConnection()
        return self._clock.callLater(ABORT_GRACE, transport.abortConnection)


def _discard(upstream):
    d = read_body(upstream, 0)
    d.addErrback(lambda _: None)
