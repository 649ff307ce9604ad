"""The one way from a route to an upstream and back.

A route builds an L{UpstreamCall} and hands it to L{Exchange.relay} (the
client gets the answer) or L{Exchange.fetch} (the gateway reads the answer
itself: Responses lifecycle, batch lines). Both go through the same steps:

  1. choose a replica of the provider's pool (by load, session and health;
     waiting for room when every one is full),
  2. send; before anything went to the client, a replica that cannot be
     reached, times out or answers 500/502/503/504/429 is left for another one,
     up to C{ROUTING_MAX_ATTEMPTS} in all (the server retries a stale pooled
     connection once by itself); a 429 saying the account's quota is spent
     (L{out_of_quota}) only for a replica on another key or another target; one that answers 401 (it
     refused the gateway's key: that replica's failure) for another one too, unless the 401 says the key
     lacks that operation's scope (L{lacks_scope}: the replica is fine, the client gets the error),
  3. map every failure to a L{gomodel.errors.GatewayError},
  4. relay: a whole JSON body byte for byte (its usage noted; one past
     L{RESPONSE_BODY_LIMIT} as it comes), an event stream with
     backpressure through an observer, or a raw passthrough,
  5. release: the replica's lease ends with the answer (a successful one
     tells the pool how long it took: the replica's pace); a body nobody
     relays is read and dropped or its connection closed; the request's
     context gets replica, usage, time to first byte and outcome.

With tracing on, the request's context carries a
L{gomodel.accounting.tracing.RequestTrace}: each send is an attempt (a client
span; its C{traceparent} goes upstream), given up or finished; with tracing
off the cost is a None check at each of those points.
"""

import re
from functools import partial

from twisted.internet.defer import CancelledError, TimeoutError as DeferredTimeout
from twisted.logger import Logger
from twisted.web.iweb import UNKNOWN_LENGTH
from zope.interface import implementer

from gomodel import jsonutil
from gomodel._twistedcompat import peek_body, plain_headers, read_again, whole_body
from gomodel.accounting.tokens import prompt_estimate, requested_tokens
from gomodel.auth.tenancy import SALTED_PROVIDER_TYPES
from gomodel.errors import (BadUpstreamResponse, ModelNotFound, NoReadyReplica, ReplicasBusy, StreamFailed,
                            UpstreamError, UpstreamTimeout, UpstreamUnreachable)
from gomodel.http.context import CLIENT_STALLED, STREAM_MAX_DURATION
from gomodel.http.headers import (CACHE_CONTROL, CONTENT_LENGTH, CONTENT_TYPE, ENDPOINT_LOAD_METRICS, METADATA,
                                  RETRY_AFTER, X_ACCEL_BUFFERING, X_GOMODEL_REPLICA, copy_response_headers,
                                  is_event_stream, media_type)
from gomodel.interfaces import IStreamObserver
from gomodel.proxy import gather as gathered
from gomodel.proxy.relay import END_LINGER, ClientStalled, StreamRelay, StreamTooLong, UpstreamIdle
from gomodel.proxy.renamed import model_named, rewriting
from gomodel.proxy.transfers import NulledTransfers, without_transfers
from gomodel.proxy.sse import (MAX_EVENT_BYTES, RESPONSE_END_TYPES, SSEFramer, StreamIncomplete, error_in,
                               event_around, event_kind, event_object, events_end, failure_in, sequence_after)
from gomodel.routing.pool import HOLD_MAX
from gomodel.routing.vllm_metrics import parse_load_header
from gomodel.upstream.client import BodyTooLarge, BoundedCollector, discard, read_body, within
from gomodel.upstream.errors import (error_shown, hidden_in, lacks_scope, out_of_quota, upstream_error,
                                     with_retry_after, without_address)

ERROR_BODY_LIMIT = 1024 * 1024
RESPONSE_BODY_LIMIT = 256 * 1024 * 1024
ABORT_GRACE = 10.0  # seconds a broken stream's error event gets to reach the client
# Answers that send a request to another replica, when there is one and nothing went to the client:
# vLLM's 500 is its engine failing (a replica shutting down answers it too), the others are overload.
FAILOVER_STATUSES = frozenset((429, 500, 502, 503, 504))
# The paths whose answer may be text (a transcription's text, srt or vtt), or empty text (a silent recording's).
_TRANSCRIPTS = ("/audio/transcriptions", "/audio/translations")
_NOT_TAKEN = (NoReadyReplica.code, ReplicasBusy.code)  # a provider that could not take a request (no send failed)
_QUOTA_SPENT = "its account's quota is spent (HTTP 429 insufficient_quota)"  # (logged: L{Replica.asked_to_wait})


def fails_over(error) -> bool:
    """Whether a call that failed with C{error} (what L{Exchange.relay} raised) may be sent to another target:
    its upstreams could not be reached, timed out, were not ready or busy, no longer list its model (it
    waited for room meanwhile), or answered a L{FAILOVER_STATUSES} status; never the gateway's own refusal (a
    limit, a budget) or the upstream's answer to a bad request."""
    if isinstance(error, UpstreamError):
        return error.status in FAILOVER_STATUSES
    return isinstance(error, (UpstreamUnreachable, UpstreamTimeout, NoReadyReplica, ReplicasBusy, ModelNotFound))


class UpstreamCall:
    """One request to send upstream, and how its answer is to be relayed (made by L{upstream_call}).

    @ivar path: an OpenAI API path (C{"/chat/completions"}), or with
        C{native} a provider-native one (see L{gomodel.interfaces.IUpstream.url}).
    @ivar query: the raw query string to append, without C{?}.
    @ivar headers: extra request headers, name -> list of values.
    @ivar content_type: the body's type, or None to send none of ours.
    @ivar observer: for event streams, an L{gomodel.interfaces.IStreamObserver}.
    @ivar observe: C{(pool)} -> the observer of an event stream that pool answered, where its handling depends
        on the provider that answers (a fallback's type may differ from the first target's), or None: C{observer}.
    @ivar transform: for whole bodies, bytes -> the bytes to send instead. One that parses the
        upstream's answer anyway may note its C{usage} object on the request context
        (C{ctx.usage}); otherwise the exchange reads it from the answer's bytes (L{usage_of}).
    @ivar raw: relay any status and body as they come (passthrough).
    @ivar ends: with C{raw}, the L{StreamEnd} of an event stream answered (200) to it, or None where it has none.
    @ivar shown: with C{raw}, C{shown(body, upstream)}: the body its client gets of a 2xx JSON answer (uncompressed)
        that is within L{ERROR_BODY_LIMIT} (read whole for it: L{answer_shown}, L{response_shown}); or None (a class
        attribute: set after the call is made), each answer relayed as it comes.
    @ivar rewrite: for event streams with an observer (with C{raw}, any event stream), bytes -> bytes: what the client
        gets of its events (whole, as the observer passes them), or None (a class attribute: set after the call is
        made).
    @ivar vet: an async function of the upstream's L{IResponse}, run before
        anything is relayed; it may raise (and then reads or drops the body itself).
    @ivar model: the upstream model id (only replicas that list it get the
        call), or None for any replica.
    @ivar affinity: a session or prompt-prefix key (see L{gomodel.routing.affinity}), or None.
    @ivar prefer: the index of the replica to use while it can (a Responses follow-up), or None.
    @ivar pin: the index of the only replica to use (C{X-Gomodel-Replica}), or None.
    @ivar fallbacks: L{gomodel.routing.registry.Route}s tried, in order, when
        every replica of the first failed before the first byte.
    @ivar rebody: C{(upstream model, provider)} -> the body for that model at that
        provider (with C{fallbacks}), or C{(path, body)} where that provider is sent it at another path (a
        translated C{/v1/responses} batch line's fallback with a Responses API of its own gets it natively).
    @ivar counted: what the request's tokens are estimated from where no usage says them (the limits' reservation,
        a prompt the upstream read before the client left): its C{body}, or a JSON stand-in for one that is no
        text (an audio form's fields without its file).
    @ivar asked: the output tokens its body asks for at most, read by the route from the body it parsed and
        dumped (L{gomodel.accounting.tokens.asked_tokens}; 0: none), so the limits need not scan C{counted} for
        them; or None: read from C{counted} (L{gomodel.accounting.tokens.requested_tokens}).
    @ivar limited: whether it passes every limit and budget (L{gomodel.limits.gate.Gate.admit}); a token count
        (Messages' C{count_tokens}, Responses' C{input_tokens}, vLLM's C{tokenize}) generates nothing: it takes
        only a slot of its key's caps on requests in flight.
    @cvar blames: whether an answer that breaks off counts as its replica's failure (a replay of events its
        instance may keep none of breaks off though the replica is well: its call says C{False}).
    """

    blames = True
    shown = None
    rewrite = None


_new = object.__new__


def upstream_call(path, body=None, method=b"POST", native=False, query=b"", headers=None,
                  content_type=b"application/json", observer=None, transform=None, raw=False, ends=None, vet=None,
                  model=None, affinity=None, prefer=None, pin=None, fallbacks=(), rebody=None, counted=None,
                  observe=None, limited=True, asked=None) -> UpstreamCall:
    """An L{UpstreamCall} to C{path} with C{body} (its other fields by keyword: every caller names them).

    A function, not the class's C{__init__}: CPython 3.11 hands a class call's keywords to C{__init__} in a dict
    it makes and takes apart again, about 2,500 instructions a call more than a function's call. They are not
    marked keyword-only (C{*}) either: CPython 3.11 fills each keyword-only default a call leaves out with a dict
    lookup, and a request's call leaves out some fifteen, about 2,000 instructions; positional ones come from a
    tuple."""
    # (one store each, not a dict assigned to __dict__: such an instance keeps a dict of its own, which
    # CPython reads and writes slower than the inline values stores give it; more than the bytecodes saved)
    call = _new(UpstreamCall)
    call.limited = limited
    call.method = method
    call.path = path
    call.body = body
    call.counted = body if counted is None else counted
    call.asked = asked
    call.native = native
    call.query = query
    call.headers = headers
    call.content_type = content_type
    call.observer = observer
    call.observe = observe
    call.transform = transform
    call.raw = raw
    call.ends = ends
    call.vet = vet
    call.model = model
    call.affinity = affinity
    call.prefer = prefer
    call.pin = pin
    call.fallbacks = fallbacks
    call.rebody = rebody
    return call


class Fetched:
    """A whole answer read by L{Exchange.fetch}, and who gave it.

    @ivar response: the L{IResponse} (its status and headers).
    @ivar body: its body (at most L{RESPONSE_BODY_LIMIT} bytes for a success, L{ERROR_BODY_LIMIT} for an error).
    @ivar upstream: the pool that answered: the call's, or one of its C{fallbacks}' providers.
    @ivar model: the upstream model sent to it.
    @ivar replica: the index of the replica of C{upstream} that answered.
    @ivar seconds: from its send to the whole answer read.
    @ivar path: the path it was sent at (the call's, or a fallback's own: L{UpstreamCall.rebody}).
    """

    __slots__ = ("response", "body", "upstream", "model", "replica", "seconds", "path")

    def __init__(self, response, body, upstream, model, replica=None, seconds=None, path=None):
        self.response = response
        self.body = body
        self.upstream = upstream
        self.model = model
        self.replica = replica
        self.seconds = seconds
        self.path = path


class _BrokeOff(Exception):
    """A whole answer broke off before any of it went to the client (C{error}: what to tell it)."""

    def __init__(self, error):
        super().__init__(error)
        self.error = error


class Exchange:
    """Sends L{UpstreamCall}s and relays or reads their answers."""

    log = Logger()

    def __init__(self, clock, timeouts, *, max_attempts=3, admit=None, timers=None, retried=None):
        """
        @param admit: C{admit(request, ctx, upstream, call)}, returning None or a Deferred, run before a
            relayed call is sent (the limits and budgets, L{gomodel.limits.gate.Gate.admit});
            what it raises is the answer.
        @param timers: what the response-header timeout of a body being read runs on (the gateway's
            L{gomodel.timers.Timers}); C{clock} when None.
        @param retried: C{retried(pool, to)}, told of each request that goes on to another replica or target
            (L{failed_over}; the metrics' L{gomodel.accounting.metrics.GatewayMetrics.retried}), or None.
        """
        self._clock = clock
        self._timers = timers if timers is not None else clock
        self._timeouts = timeouts
        self.max_attempts = max_attempts  # (ROUTING_MAX_ATTEMPTS: the routes that relay once a target bound by it too)
        self.admit = admit
        self.retried = retried

    # -- the two entry points ------------------------------------------------------

    async def relay(self, request, ctx, upstream, call: UpstreamCall):
        """Send C{call} to a replica of C{upstream} (a pool) and relay the answer onto C{request}.

        @return: the body to write (a whole answer), or None once the answer
            was written (a stream, a passthrough), or broke off and the
            connection was closed.
        @raise gomodel.errors.GatewayError: before anything was sent to the client.
        @raise CancelledError: the client left.
        """
        ctx.hold()
        trace = ctx.trace
        try:
            # Once per request: a route that relays again (Messages or Responses translated after
            # the native route was missing) must not take a second slot it would never give back.
            if self.admit is not None and ctx.admission is None:
                admitting = self.admit(request, ctx, upstream, call)
                if admitting is not None:
                    await admitting
            # tried: the replicas of target `first` (of the call's) this request failed on (their send, or their
            # answer broke off), kept across sends (L{_send})
            pool, tried, first = upstream, [], 0
            while True:
                try:
                    response, replica, upstream, model, sent, first, path = await self._send(
                        ctx.request_id, pool, call, tried, trace, None, ctx, first)
                except (UpstreamTimeout, UpstreamUnreachable, CancelledError) as e:
                    reached = getattr(e, "reached", None)
                    _reached(ctx, reached)
                    if reached is not None:  # (the client left, or no answer came: the upstream read the prompt)
                        _left_early(ctx, call.counted)
                    raise
                took = None  # seconds the answer took, once it succeeded (the replica's pace)
                try:
                    if model != ctx.upstream_model or upstream.name != ctx.provider:
                        ctx.route(upstream, ctx.model, model)  # a fallback target served it
                    ctx.replica = replica.index
                    request.responseHeaders.put(X_GOMODEL_REPLICA, b"%d" % replica.index)
                    answer = await self._answer(request, ctx, upstream, response, call, path)
                    if response.code < 300 and ctx.outcome is None:
                        took = self._clock.seconds() - sent
                        replica.succeeded()
                    return answer
                except _BrokeOff as e:  # nothing went to the client yet: another replica may answer
                    if trace is not None:
                        trace.failed(e.error.code)
                    if call.blames:
                        replica.failed(e.error.message)
                    tried.append(replica)
                    ctx.attempts += 1
                    again = self._again(upstream, model, call, tried, ctx.attempts, first < len(call.fallbacks),
                                        e.error.message, ctx)
                    if again == "target":  # (a failover rule applies as to a send that failed)
                        first = first + 1
                        tried.clear()
                    elif again is None:
                        _left_early(ctx, call.counted)
                        raise e.error from None
                    continue
                except BaseException as e:
                    if trace is not None:
                        trace.failed(_error_type(e))
                    if isinstance(e, (CancelledError, UpstreamTimeout, UpstreamUnreachable)):
                        _left_early(ctx, call.counted)
                    raise
                finally:
                    upstream.release(replica, took)
                    if trace is not None:
                        trace.finished(ctx)
        finally:
            ctx.release()

    async def _answer(self, request, ctx, upstream, response, call, path):
        """Relay C{response} onto C{request} as C{call} says (see L{relay}), C{path} the one it was sent at (C{call}'s,
        or a fallback's own: L{UpstreamCall.rebody}).

        @raise _BrokeOff: a whole answer or a stream broke off (a stream: or sent nothing for too long)
            before anything was sent.
        """
        if call.vet is not None:
            await call.vet(response)
        if call.raw:  # a passthrough
            if CONTENT_TYPE not in plain_headers(response.headers):
                request.defaultContentType = None  # (Twisted's, text/html: no type the upstream gave its body)
            if response.code >= 300 and response.code != 304 and upstream.hidden and request.method != b"HEAD":
                # (an event stream's too; one too large to search is no answer: L{_raw_error})
                return await self._raw_error(request, ctx, upstream, response, call)
            events = is_event_stream(response.headers)
            answer = not events and 200 <= response.code < 300 and request.method != b"HEAD" and media_type(
                response.headers).endswith(b"json")  # (a JSON answer)
            if events:
                ctx.stream = True
            elif answer and call.shown is not None and upstream.hidden_pattern is not None:
                body = await self._small(upstream, response)  # (one too large to hold goes as it comes)
                if body is not None:
                    return self._shown(request, ctx, upstream, response, call, body)
            ends = call.ends if events and response.code == 200 and request.method != b"HEAD" else None
            rewrite = call.rewrite if events else None
            if ctx.transfers_dropped and upstream.type in SALTED_PROVIDER_TYPES:  # (its request went without them)
                if events:
                    rewrite = rewriting(rewrite, without_transfers)  # (as _shown's)
                elif answer and response.headers.getRawHeaders(b"content-encoding") is None:
                    rewrite = NulledTransfers()  # (too large to hold, or of unknown length: read as it passes)
            return await self._relay_raw(request, ctx, upstream, response, events, call.counted, ends, rewrite)
        if response.code >= 400:
            raise await self._error(upstream, response)
        if not 200 <= response.code < 300:
            discard(response)
            raise BadUpstreamResponse(f"The upstream provider '{upstream.name}' answered HTTP {response.code}.")
        media = media_type(response.headers)
        if media == b"text/event-stream":
            observer = call.observer if call.observe is None else call.observe(upstream)
            if observer is None:  # (a whole answer was asked for: only an event stream's way looks)
                gather = gathered.BY_PATH.get(path)
                if gather is not None:
                    return await self._gathered(request, ctx, upstream, response, call, path, gather)
                if upstream.renamed:  # (none to make of it: its events are relayed whole, to be written)
                    observer = UsageTap(True)
            rewrite = call.rewrite
            if observer is not None and (upstream.renamed or ctx.transfers_dropped):
                rewrite = _stream_rewrite(ctx, upstream, rewrite)
            ctx.stream = True
            return await self._relay_stream(request, ctx, upstream, response, observer, True, call.counted,
                                            rewrite=rewrite)
        # (a proxy's page, a web UI's: no API answers in text but its events and a transcription's text, srt or vtt,
        # a silent recording's empty; text/json is JSON)
        transcript = media.startswith(b"text/") and call.path in _TRANSCRIPTS
        if media.startswith(b"text/") and not media.endswith(b"json") and not transcript:
            discard(response)
            raise BadUpstreamResponse(f"The upstream provider '{upstream.name}' answered HTTP {response.code} with "
                                      "a text page, not JSON.")
        body = whole_body(response)  # (a small answer came whole with its head: no wait, no read)
        if body is None:
            if call.transform is None and (media.startswith(b"audio/") or response.length is not UNKNOWN_LENGTH
                                           and response.length > RESPONSE_BODY_LIMIT):
                # Too large to hold (a big batch's embeddings), or audio (a speech: its first bytes play before its
                # end), nothing to change in it: relayed as it comes.
                return await self._relay_raw(request, ctx, upstream, response, body=call.counted)
            try:
                body = await self.read(upstream, response, RESPONSE_BODY_LIMIT)
            except UpstreamUnreachable as e:
                raise _BrokeOff(e) from None
        if not body and not transcript:  # (a 204, an empty 200: no answer any client can read)
            raise BadUpstreamResponse(f"The upstream provider '{upstream.name}' answered HTTP {response.code} "
                                      "without a body.")
        return self._whole(request, ctx, upstream, response, call, body)

    async def _raw_error(self, request, ctx, upstream, response, call):
        """A passthrough's error answer (or redirect) as the upstream sent it (status, headers, body), but for its
        addresses (and key): replaced in the body as in any error's message (L{hidden_in}), the headers naming them
        left out (L{copy_response_headers}). An error is small: it is read whole first (one past
        L{ERROR_BODY_LIMIT}, which could not be searched, is the gateway's 502 C{response_too_large}).

        @raise _BrokeOff: it broke off before any of it went to the client.
        """
        try:
            body = await self.read(upstream, response, ERROR_BODY_LIMIT)
        except UpstreamUnreachable as e:
            raise _BrokeOff(e) from None
        codings = response.headers.getRawHeaders(b"content-encoding")
        if codings is None:
            return self._whole(request, ctx, upstream, response, call, hidden_in(body, upstream))
        # Compressed though the gateway asked for none (a proxy in front of it): searched uncompressed, relayed so;
        # in a coding it cannot read, its status in the gateway's words.
        shown = uncoded(body, codings, ERROR_BODY_LIMIT)
        answer = self._whole(request, ctx, upstream, response, call, hidden_in(shown, upstream) if shown is not None
                             else upstream_error(response.code, b"", upstream.name).body())
        request.responseHeaders.removeHeader(b"content-encoding")
        if shown is None:
            request.responseHeaders.put(CONTENT_TYPE, b"application/json")
        return answer

    def _shown(self, request, ctx, upstream, response, call, body):
        """A passthrough's whole 2xx JSON answer as its C{shown} gives it, without transfer fields where its request
        went without them (L{gomodel.proxy.transfers}); one the upstream compressed (a proxy's gzip) searched
        uncompressed, and relayed so where that changed it (else as it came, as one in a coding the gateway cannot
        read does)."""
        codings = response.headers.getRawHeaders(b"content-encoding")
        if codings is None:
            return self._whole(request, ctx, upstream, response, call, _passed_shown(ctx, upstream, call, body))
        plain = uncoded(body, codings, ERROR_BODY_LIMIT)
        shown = plain if plain is None else _passed_shown(ctx, upstream, call, plain)
        if shown is plain:
            return self._whole(request, ctx, upstream, response, call, body)
        answer = self._whole(request, ctx, upstream, response, call, shown)
        request.responseHeaders.removeHeader(b"content-encoding")
        return answer

    async def _small(self, upstream, response):
        """The whole body of C{response} where it came with its head or says it is within L{ERROR_BODY_LIMIT}, else
        None (left to be relayed as it comes).

        @raise _BrokeOff: it broke off.
        """
        body = whole_body(response)
        if body is not None or response.length is UNKNOWN_LENGTH or response.length > ERROR_BODY_LIMIT:
            return body
        try:
            return await self.read(upstream, response, ERROR_BODY_LIMIT)
        except UpstreamUnreachable as e:
            raise _BrokeOff(e) from None

    async def _gathered(self, request, ctx, upstream, response, call, path, gather):
        """The whole answer for a call that did not ask to stream, made of the event stream the upstream sent
        anyway (L{gomodel.proxy.gather}: C{gather}, that of the C{path} it was sent at); then as L{_whole}.

        @raise _BrokeOff: it broke off (nothing went to the client: another replica may answer).
        @raise gomodel.errors.UpstreamError: the stream carried an error event (its status: the error's own
            code where it is one, else 502).
        @raise gomodel.errors.BadUpstreamResponse: it did not end properly, or held what is no event.
        """
        try:
            stream = await self.read(upstream, response, RESPONSE_BODY_LIMIT, GATHERED_ENDS.get(path))
        except UpstreamUnreachable as e:
            raise _BrokeOff(e) from None
        try:
            body = gather(stream)
        except gathered.InBandError as e:
            raise upstream_error(e.status, e.body, upstream.name, upstream.hidden) from None
        except StreamIncomplete as e:
            raise BadUpstreamResponse(f"The upstream provider '{upstream.name}' streamed an answer that was asked "
                                      f"for whole, and {e}.") from None
        answer = self._whole(request, ctx, upstream, response, call, body)
        request.responseHeaders.put(CONTENT_TYPE, b"application/json")
        return answer

    async def fetch(self, request_id: bytes, upstream, call: UpstreamCall, trace=None, entering=None):
        """Send C{call} to C{upstream} (failing over to the call's C{fallbacks} as L{relay} does) and read
        the whole answer, whatever its status.

        @param trace: the request's L{gomodel.accounting.tracing.RequestTrace}, or None.
        @param entering: C{entering(pool)}, returning an awaitable, awaited before the call goes on to a
            fallback target's pool (a batch line moves to that provider's slot), or None.

        @return: (awaited) a L{Fetched}: the answer, its body, and the pool and upstream model that gave it.
        @raise gomodel.errors.GatewayError: no whole answer could be had
            (L{gomodel.errors.UpstreamUnreachable} when the upstream could
            not be reached or broke off: worth trying again); an
            L{UpstreamTimeout} or L{UpstreamUnreachable} has a C{reached} as
            L{_send}'s has (the answer's own replica where its body broke off), and so has a C{CancelledError}
            once a replica took the request.
        """
        response, replica, upstream, model, sent, _, path = await self._send(request_id, upstream, call, [], trace,
                                                                              entering)
        took = None
        try:
            limit = RESPONSE_BODY_LIMIT if response.code < 400 else ERROR_BODY_LIMIT
            # (an event stream answered anyway, read whole to be gathered: cut once past its end, as in L{_gathered})
            ends = GATHERED_ENDS.get(path) if response.code < 300 and is_event_stream(response.headers) else None
            body = await self.read(upstream, response, limit, ends)
            seconds = self._clock.seconds() - sent
            if response.code < 300:
                took = seconds
                replica.succeeded()
            return Fetched(response, body, upstream, model, replica.index, seconds, path)
        except BaseException as e:
            if trace is not None:
                trace.failed(_error_type(e))
            if isinstance(e, (UpstreamTimeout, UpstreamUnreachable, CancelledError)):
                e.reached = (upstream, replica.index, model)  # (its answer came, but not whole; or was cut short)
            raise
        finally:
            upstream.release(replica, took)
            if trace is not None:
                trace.finished()

    # -- the steps ------------------------------------------------------------------

    async def _send(self, request_id, pool, call, tried, trace=None, entering=None, ctx=None, first=0):
        """Choose a replica and send C{call}, failing over before the first byte.

        The replicas of C{pool} first, then the call's fallback routes (a
        virtual model's other targets, failover candidates), each with the
        body made for its model; at most C{max_attempts} sends in all.

        @return: C{(response, replica, pool, model, sent, target, path)}: the L{IResponse}
            (any status), the L{gomodel.routing.pool.Replica} that gave it
            (whose lease the caller releases, with the seconds since C{sent}
            when the answer succeeded), its pool, the upstream model sent,
            when it was sent, which target it was (0: C{pool}, then the
            call's fallbacks), and the path it was sent at (a fallback's may be its own: L{UpstreamCall.rebody}).
        @param tried: the replicas of target C{first} not to use (this request failed there: an earlier call's
            send, or an answer that broke off), a list this call keeps: on return it holds those of the target
            that answered (each replica whose send failed added, emptied for each next target), so that a
            next call for the same request (L{relay}'s, when the answer broke off) passes over them all.
        @param first: the target to begin with (one whose replicas all broke off an answer is passed over).
        @param trace: the request's L{gomodel.accounting.tracing.RequestTrace}, or None:
            each send is an attempt; the one returned is still open.
        @param entering: what L{fetch} was given (awaited with each fallback target's pool before it is
            tried), or None.
        @param ctx: the request's L{gomodel.http.context.RequestContext} (its C{attempts}, the failed sends of
            every target it was sent to, are counted on), or None (a batch line, a refresh).
        @raise gomodel.errors.GatewayError: no answer; an L{UpstreamTimeout} or L{UpstreamUnreachable} has a
            C{reached}: C{(pool, replica index, model)} of the last send that timed out or lost its connection
            once sent (the request reached it: its C{sent}), or None; a C{CancelledError} (the client left) while a send waited has the same of that send.
        """
        targets = [(pool, call.model)] + [(route.provider, route.upstream_model) for route in call.fallbacks]
        attempts = 0 if ctx is None else ctx.attempts
        reached = None  # the last send that reached its replica: (pool, replica index, model), no answer came
        for number, (pool, model) in enumerate(targets[first:] if first else targets, first):
            more = number + 1 < len(targets)
            if number == 0:
                body = call.body
                path = call.path
            else:
                body = call.rebody(model, pool)
                path = call.path
                if body.__class__ is tuple:  # (sent at another path there: L{UpstreamCall.rebody})
                    path, body = body
            if number != first:
                tried.clear()
                if entering is not None:
                    await entering(pool)
            # a long answer is kept off clearly slower replicas (one replica: nothing to choose)
            size = partial(requested_tokens, body, path) if len(pool.replicas) > 1 else None
            if call.affinity is not None and call.pin is None:
                recalling = pool.recall(call.affinity)  # a session this process has not seen: its shared pin
                if recalling is not None:
                    await recalling
            while True:
                prefer = call.prefer if number == 0 else None
                # (by position: model, exclude, [pin,] prefer, affinity, size; a keyword call is slower in CPython 3.11)
                replica = None if call.pin is not None else pool.take(model, tried, prefer, call.affinity, size)
                try:
                    if replica is None:  # pinned, or nothing free now: wait, or learn why not
                        replica = await pool.acquire(model, tried, call.pin, prefer, call.affinity, size)
                except (NoReadyReplica, ReplicasBusy, ModelNotFound) as e:  # (the last: its replicas dropped it)
                    if more:
                        self.failed_over(pool, "target", e.code, None, ctx)  # this target cannot take it now: the next
                        break
                    raise
                server = replica.server
                url = server.url(path, call.native)
                if call.query:
                    url += "?" + call.query.decode("latin-1")
                headers = call.headers
                try:
                    if trace is not None:
                        headers = trace.attempt(pool, replica, model, call)
                    sent = self._clock.seconds()
                    response = await server.send(call.method, url, body, request_id, headers, call.content_type)
                except (UpstreamUnreachable, UpstreamTimeout) as e:
                    if trace is not None:
                        trace.failed(e.code)
                    pool.release(replica)
                    replica.failed(e.message)
                    tried.append(replica)
                    attempts += 1
                    if ctx is not None:
                        ctx.attempts = attempts
                    if e.sent:  # (it timed out or was lost once sent; not refused)
                        reached = (pool, replica.index, model)
                    again = self._again(pool, model, call, tried, attempts, more, e.message, ctx)
                    if again == "replica":
                        continue
                    if again == "target":
                        break
                    e.reached = reached
                    raise
                except BaseException as e:
                    if trace is not None:
                        trace.failed(_error_type(e))
                    pool.release(replica)
                    if isinstance(e, CancelledError):  # (the client left while it waited)
                        e.reached = (pool, replica.index, model)
                    raise
                try:  # (whatever goes wrong reading its answer's head, its lease is given back)
                    if trace is not None:
                        trace.answered(response.code)
                    report = plain_headers(response.headers).get(ENDPOINT_LOAD_METRICS)
                    if report is not None:
                        replica.answered(parse_load_header(report[0]))
                    if response.code < 300:  # (a success: its whole answer is the relay's to judge, a stream may break)
                        return response, replica, pool, model, sent, number, path
                    spent = False  # (a 429 saying the account's quota is spent: no rate limit, L{out_of_quota})
                    refused = response.code == 401  # (its key for that replica refused: misconfigured, or revoked)
                    if response.code == 429:
                        response, spent = await self._said(response, out_of_quota)
                    elif refused:  # (not where the key lacks only this operation's scope: good for the others)
                        response, scoped = await self._said(response, lacks_scope)
                        refused = not scoped
                    if response.code >= 500:
                        # (one that asks to be left alone a while, Retry-After, is busy, as with its 429: not failing)
                        if response.code not in FAILOVER_STATUSES or RETRY_AFTER not in plain_headers(response.headers):
                            replica.failed(f"HTTP {response.code}")
                    elif refused:
                        replica.failed("HTTP 401: it refused the gateway's key")
                    elif response.code != 429:  # (a 3xx or 4xx: the replica answered)
                        replica.succeeded()
                    if spent:  # its account's replicas passed over a while (no wait lifts it), and not asked again:
                        account = _account(replica)  # one on another key (another account) may answer
                        for other in pool.replicas:
                            if _account(other) == account:
                                other.asked_to_wait(b"%d" % HOLD_MAX, _QUOTA_SPENT)
                                if other is not replica and other not in tried:
                                    tried.append(other)
                        why = "HTTP 429: insufficient_quota"
                    elif response.code in FAILOVER_STATUSES:
                        retry_after = plain_headers(response.headers).get(RETRY_AFTER)
                        if retry_after is not None:
                            replica.asked_to_wait(retry_after[0])
                        why = f"HTTP {response.code}"
                    elif refused:
                        why = "HTTP 401: it refused the gateway's key"
                    elif response.code == 404 and model is not None and _forgot(pool, replica, model, response, tried):
                        why = f"HTTP 404: it has no {model} any more"
                    else:
                        return response, replica, pool, model, sent, number, path
                    attempts += 1
                    if ctx is not None:
                        ctx.attempts = attempts
                    again = self._again(pool, model, call, tried + [replica], attempts, more, why, ctx)
                    if again is not None:
                        if trace is not None:
                            trace.failed(str(response.code))
                        discard(response)
                        pool.release(replica)
                        tried.append(replica)
                        if again == "replica":
                            continue
                        break
                    return response, replica, pool, model, sent, number, path
                except BaseException:
                    discard(response)
                    pool.release(replica)
                    raise

    def _again(self, pool, model, call, tried, attempts, more, why, ctx=None):
        """Where a call that failed on the replicas C{tried} goes: C{"replica"}, C{"target"} or None (C{ctx}:
        the request's context, or None: L{failed_over}'s)."""
        if call.pin is not None or attempts >= self.max_attempts:
            return None
        if pool.has_alternative(model, tried):
            where = "replica"
        elif more:
            where = "target"
        else:
            return None
        self.failed_over(pool, where, why, tried[-1].index, ctx)
        return where

    def failed_over(self, pool, where, why, index=None, ctx=None):
        """Log and count (C{retried}) that a request goes on to another C{where} before its first byte:
        C{"replica"} of C{pool}, or C{"target"} (as the Responses and Messages routes also do when a target
        fails), because its send to C{pool} (its replica C{index}, when known) failed or C{pool} could not
        take it (C{why}: at debug level when it had no ready or free replica, which its replicas' own checks
        log, once a state change, where this is once a request). C{ctx}: the request's context (its C{retries}
        counted, for the access log), or None."""
        if index is None:
            (self.log.debug if why.startswith(_NOT_TAKEN) else self.log.info)(
                "provider {provider} failed ({why}); trying another {where}", provider=pool.name, why=why, where=where)
        else:
            self.log.info("provider {provider} replica {index} failed ({why}); trying another {where}",
                          provider=pool.name, index=index, why=why, where=where)
        if self.retried is not None:
            self.retried(pool, where)
        if ctx is not None:
            ctx.retries += 1

    async def _said(self, response, judge):
        """C{(response, judged)}: an error C{response} (a stand-in, read again as it came, where its body had not
        all come with its head) and what C{judge} (L{out_of_quota}, L{lacks_scope}) says of its status and body."""
        body = peek_body(response)
        if body is None:
            try:
                body = await within(read_body(response, ERROR_BODY_LIMIT), self._timeouts.response_header,
                                    self._timers)
            except CancelledError:
                raise
            except Exception:  # (too large, broke off, too slow: an error like any of its status)
                body = b""
            response = read_again(response, body)
        return response, judge(response.code, body)

    async def read(self, upstream, response, limit, ends=None):
        """The whole body of C{response}, within C{limit} bytes and the response-header timeout.

        @param ends: of an event stream read whole (to be gathered), its L{StreamEnd}: what came once that end passed
            and L{END_LINGER} more is the body, however long the upstream holds it open (L{_GatheredBody}); or None.
        @raise gomodel.errors.BadUpstreamResponse: too large (code
            C{response_too_large}); or L{gomodel.errors.UpstreamTimeout}; or
            L{gomodel.errors.UpstreamUnreachable} when it broke off.
        """
        body = whole_body(response)  # it came with the head: no wait
        try:
            if body is None:
                reading = read_body(response, limit) if ends is None else read_body(
                    response, limit, partial(_GatheredBody, ends=ends, clock=self._timers))
                return await within(reading, self._timeouts.response_header, self._timers)
            if len(body) > limit:
                raise BodyTooLarge(limit)
            return body
        except CancelledError:
            raise
        except BodyTooLarge:
            raise BadUpstreamResponse(f"The answer of '{upstream.name}' is too large to relay.",
                                      code="response_too_large") from None
        except DeferredTimeout:
            raise UpstreamTimeout(f"The upstream provider '{upstream.name}' stopped sending its answer.") from None
        except Exception:
            raise UpstreamUnreachable(f"The upstream provider '{upstream.name}' broke off its answer.") from None

    async def _error(self, upstream, response):
        """The L{gomodel.errors.UpstreamError} for an answer with status >= 400."""
        try:
            body = await read_body(response, ERROR_BODY_LIMIT)
        except CancelledError:
            raise
        except Exception:
            body = b""
        return with_retry_after(upstream_error(response.code, body, upstream.name, upstream.hidden), response)

    def _whole(self, request, ctx, upstream, response, call, body):
        """A whole answer for the client: usage noted (where something records it), transformed
        if asked, headers copied."""
        copy_response_headers(response, request, False, upstream.hidden_pattern)  # (by position: quicker)
        if call.transform is not None:
            answer = body
            try:
                body = call.transform(answer)
            except (ValueError, KeyError, TypeError, AttributeError):
                raise BadUpstreamResponse(
                    f"The answer of the upstream provider '{upstream.name}' could not be read.") from None
            finally:
                # (unless the transform, which parsed it, noted it; an estimate is an earlier attempt's, whose
                # stream broke off before its body: this answer's usage is the request's)
                if ctx.recorded and (ctx.usage is None or ctx.estimated):
                    ctx.usage, ctx.estimated = usage_of(answer), False
            request.responseHeaders.put(CONTENT_TYPE, b"application/json")
        elif ctx.recorded:
            ctx.usage, ctx.estimated = usage_of(body), False
            if ctx.usage is None:  # (a binary answer's is in its metadata)
                ctx.usage, ctx.estimated = binary_usage(response, call.counted)
        if upstream.renamed and not call.raw:  # (a model it lists by a path: named as clients know it)
            named = model_named(upstream, ctx.upstream_model)
            if named is not None:
                body = named(body)
        if ctx.transfers_dropped and upstream.type in SALTED_PROVIDER_TYPES and not call.raw:
            body = without_transfers(body)  # (its request went without them: L{gomodel.proxy.transfers})
        request.responseHeaders.put(CONTENT_LENGTH, b"%d" % len(body))
        ctx.first_byte_written()
        return body

    def _relay_raw(self, request, ctx, upstream, response, events=False, body=None, ends=None, rewrite=None):
        """Relay C{response} (an event stream with C{events}) byte for byte, its length kept (but where C{rewrite}
        writes it: a JSON answer's, L{NulledTransfers}), its usage read
        from the end of what went by, or from its C{metadata} header (L{_relay_stream}'s answer); an event
        stream goes event by event (L{UsageTap}) without its length, its in-band error noted (and written
        without the upstream's address), and is broken off where it ends inside an event or without its end
        (C{ends}, a L{StreamEnd}, where it has one), however its body ended; its events (or its pieces) written by
        C{rewrite} where it is one (a passthrough's call's: L{UpstreamCall.rewrite})."""
        tap = None
        if ctx.recorded or events:
            tap = UsageTap(events, ends, upstream if events and upstream.hidden_pattern is not None else None)
            if ctx.recorded:
                ctx.usage, ctx.estimated = binary_usage(response, body)
        return self._relay_stream(request, ctx, upstream, response, tap, events, body,
                                  keep_length=not events and rewrite is None, rewrite=rewrite)

    async def _relay_stream(self, request, ctx, upstream, response, observer, events, body=None, keep_length=False,
                            rewrite=None):
        """Relay a body (an event stream with C{events}: its answer's head says so) with flow control as it comes;
        return None when done.

        C{body} is the request's (sent upstream): an event stream that ends without its usage is charged an
        estimate of its prompt from it (L{_note_usage}).

        A stream that breaks after its head went out is never made to look
        finished: an event stream gets an in-band error event in the route's
        dialect, then the connection is closed without the body's end.

        @raise _BrokeOff: the upstream broke off, or sent none of its body for too long (its error then an
            L{UpstreamTimeout}), before any of its body went to the client (the head goes out with the first
            bytes; an SSE comment a translation drops is none) and none of it was refused as malformed:
            another replica may answer.
        @raise StreamFailed: the observer refused what came (malformed, an in-band error) before any of it
            went to the client.
        @raise UpstreamTimeout: the stream ran past its maximum duration before any of it went to the client.
        """
        headers = plain_headers(request.responseHeaders)
        ours = dict(headers)  # (put back if this head never goes out)
        copy_response_headers(response, request, keep_length, upstream.hidden_pattern)
        if events:  # (set in the header dict: setHeader checks and encodes each name and value again)
            headers[CACHE_CONTROL] = [b"no-cache"]
            headers[X_ACCEL_BUFFERING] = [b"no"]  # no buffering in a proxy in front of us
        t = self._timeouts
        relay = StreamRelay(request, self._clock, observer, idle_timeout=t.stream_idle,
                            stall_timeout=t.client_stall, max_duration=t.stream_max,
                            first_write=ctx.first_byte_written, end_written=ctx.end_written, timers=self._timers)
        relay.head_before = ours  # (put back by a drain that answers before this head went out: L{gomodel.lifecycle})
        if rewrite is not None:
            relay.rewrite = rewrite
        if request.channel is None:
            # The client left before we could start: close the upstream, nothing to relay.
            relay.finished.addErrback(lambda _: None)
            response.deliverBody(relay)
            relay.stopProducing()
            return None
        whole = whole_body(response)  # (a short stream may have come whole with its head: nothing more can come)
        if whole is not None:
            relay.relay_whole(whole)  # (no producer: there is no upstream left to hold back)
        else:
            request.registerProducer(relay, True)
            response.deliverBody(relay)
            if relay.paused and relay.transport is not None:
                # deliverBody resumed the transport after its first delivery.
                relay.transport.pauseProducing()
        streams = upstream.replicas[ctx.replica].streams  # (its replica's, cut short if it goes down)
        streams.add(relay)
        try:
            if whole is None or relay.finished.result is not None:  # (a whole body's relay has ended: fired already)
                await relay.finished
        except Exception as e:  # CancelledError too: the client left
            if relay.end_written and not isinstance(e, ClientStalled):
                # The client has the whole stream (SDKs leave at [DONE], before the body's
                # last chunk) or the upstream broke off after its end: nothing was lost.
                pass
            elif isinstance(e, CancelledError):
                raise
            elif not relay.wrote and request.channel is not None:
                request.unregisterProducer()
                headers = plain_headers(request.responseHeaders)  # (the head that never went out: not the answer's)
                headers.clear()
                headers.update(ours)
                if relay.rejected:  # (malformed, or an in-band error: no other replica is asked, and the client
                    why = _why(e)   # gets the error whole, never a 200 that holds only an error event)
                    self.log.warn("stream {request_id} ended abnormally before its first event: {why}",
                                  request_id=ctx.request_id.decode(), why=why)
                    raise StreamFailed(f"The stream ended abnormally: {why}.") from None
                if isinstance(e, StreamTooLong):  # (its time is up: no other replica is asked)
                    raise UpstreamTimeout(f"The upstream provider '{upstream.name}' sent nothing within the "
                                          "stream's maximum duration (HTTP_STREAM_MAX_DURATION).") from None
                if isinstance(e, UpstreamIdle):  # (its head came, none of its body: a hung engine, a long queue)
                    raise _BrokeOff(UpstreamTimeout(f"The upstream provider '{upstream.name}' sent nothing for "
                                                    "too long.")) from None
                raise _BrokeOff(UpstreamUnreachable(f"The upstream provider '{upstream.name}' broke off its "
                                                    "answer.")) from None
            else:
                if ctx.replica is not None and not isinstance(e, (ClientStalled, StreamTooLong)):
                    # the replica's failure (it reset, fell silent, ended without the stream's end), as a send's
                    upstream.replicas[ctx.replica].failed(_why(e))
                # Taken now, not for every stream: a Deferred made, fired and run per request. Its
                # connection is still open here (it would never fire for one already closed).
                closed = request.notifyFinish() if request.channel is not None else None
                abort = self._broken(request, ctx, relay, e, events, body)
                if closed is not None:
                    await closed.addErrback(lambda _: None)
                if abort is not None and abort.active():
                    abort.cancel()
                return None
        finally:
            streams.discard(relay)
            _note_usage(ctx, relay.observer, body)
        if ctx.outcome is None and getattr(relay.observer, "error", None) is not None:
            ctx.failed_in_band(IN_STREAM_ERROR)  # (logged and counted as the upstream's error, not as ok)
        if whole is None and request.channel is not None:
            request.unregisterProducer()
        return None

    def _broken(self, request, ctx, relay, reason, events, body):
        """End a stream that broke after its head: in-band error event, then no clean end.

        @return: the delayed call that aborts the connection if closing it
            cleanly takes too long, or None.
        """
        why = _why(reason)
        self.log.warn("stream {request_id} ended abnormally: {why}", request_id=ctx.request_id.decode(), why=why)
        error = StreamFailed(f"The stream ended abnormally: {why}.")
        _note_usage(ctx, relay.observer, body)
        ctx.broken(_CUT_HERE.get(type(reason), error.code))  # (the gateway's own cut: no upstream's failure)
        if request.channel is None:
            return None
        request.unregisterProducer()
        transport = request.transport
        if isinstance(reason, ClientStalled):
            transport.abortConnection()
            return None
        if events:
            request.write(ctx.dialect.stream_event(error, relay.observer))
        # Closing the socket without the chunked body's last chunk: the client
        # reads the error event, then an incomplete body, never a clean end.
        transport.loseConnection()
        return self._clock.callLater(ABORT_GRACE, transport.abortConnection)


class _GatheredBody(BoundedCollector):
    """Reads an event stream whole (L{Exchange._gathered}): its body, or what came until L{END_LINGER} after its own
    end (C{ends}, a L{StreamEnd}) passed, where its upstream held the body open past it (the upstream then closed), as
    L{StreamRelay} ends a relayed stream's."""

    def __init__(self, finished, limit, ends, clock):
        super().__init__(finished, limit)
        self._ends = ends
        self._clock = clock
        self._end_call = None
        self._framer = SSEFramer(max_event_bytes=limit)  # (the events as they end: the body is bounded already)

    def dataReceived(self, data):
        super().dataReceived(data)
        if self._end_call is not None or self._finished.called:
            return
        for event in self._framer.feed(data):
            for kind in self._ends.kinds:
                if event.find(kind) >= 0 and event_kind(event) == kind:
                    self._end_call = self._clock.callLater(END_LINGER, self._lingered)
                    return

    def _lingered(self):
        self._end_call = None
        if not self._finished.called:
            self.transport.stopProducing()
            self._finished.callback(b"".join(self._parts))

    def connectionLost(self, reason):
        if self._end_call is not None:
            self._end_call.cancel()
            self._end_call = None
        super().connectionLost(reason)


def _account(replica):
    """The account C{replica}'s requests are made on (its server's C{account}: the key it sends), or None."""
    return getattr(replica.server, "account", None)


def _forgot(pool, replica, model, response, tried) -> bool:
    """Whether C{replica}'s 404 C{response} says that it has no C{model}, which it listed (vLLM's "The model `...`
    does not exist.", C{param} C{model}), while another ready replica of C{pool} but those C{tried} lists it: then
    it is struck off C{replica}'s list (L{gomodel.routing.pool.Replica.forget}) and the request may go there. Only
    an answer that came whole with its head is read (a small error does), and left to be read again."""
    if not pool.has_alternative(model, tried + [replica]):
        return False
    body = peek_body(response)
    if body is None:
        return False
    try:
        error = jsonutil.loads(body)["error"]
        if error.get("param") != "model" and "does not exist" not in error["message"]:
            return False
    except (ValueError, KeyError, TypeError, AttributeError):
        return False
    replica.forget(model)
    return True


def _why(reason) -> str:
    """Why a stream ended abnormally, as its client is told (C{reason}: what L{StreamRelay.finished} failed with)."""
    if isinstance(reason, ClientStalled):
        return "the client stopped reading"
    if isinstance(reason, UpstreamIdle):
        return "the upstream sent nothing for too long"
    if isinstance(reason, StreamTooLong):
        return "the stream ran past its maximum duration"
    if isinstance(reason, StreamIncomplete):
        return str(reason)
    return "the upstream connection broke off"


def _reached(ctx, reached):
    """Note on C{ctx} the replica that a request which got no answer reached (a send's C{reached}: C{(pool,
    replica index, upstream model)}, or None): it went there (its usage record says so) though none came."""
    if reached is not None:
        pool, index, model = reached
        if model != ctx.upstream_model or pool.name != ctx.provider:
            ctx.route(pool, ctx.model, model)
        ctx.replica = index


def _left_early(ctx, body):
    """The client of a request sent upstream left before its answer's usage came (none noted on C{ctx}), or
    that answer never came (the upstream timed out, or its connection was lost once the request was sent): its
    prompt, which the upstream read anyway, is its usage, estimated from the request C{body}
    (L{prompt_estimate})."""
    if ctx.usage is None:
        prompt = prompt_estimate(body)
        if prompt:
            ctx.usage, ctx.estimated = {"prompt_tokens": prompt}, True


def _error_type(error) -> str:
    """The C{error.type} of an attempt that raised C{error}: its gateway error code, or its class."""
    if isinstance(error, CancelledError):
        return "cancelled"
    return getattr(error, "code", None) or type(error).__name__


def _passed_shown(ctx, upstream, call, body: bytes) -> bytes:
    """What a passthrough's client gets of C{body}, its whole 2xx JSON answer: without transfer fields where its
    request went without them (L{without_transfers}), then as its call's C{shown} gives it."""
    if ctx.transfers_dropped and upstream.type in SALTED_PROVIDER_TYPES:
        body = without_transfers(body)
    return call.shown(body, upstream)


def _stream_rewrite(ctx, upstream, rewrite):
    """What the client gets of an observed stream's events that C{upstream} answers (L{StreamRelay}'s rewrite):
    written by C{rewrite} (its call's own, or None), with the model's public id where C{upstream} lists the model
    by a path (L{model_named}), and without transfer fields where the request went without them
    (L{without_transfers}); None where nothing is written."""
    if upstream.renamed:
        rewrite = rewriting(rewrite, model_named(upstream, ctx.upstream_model))
    if ctx.transfers_dropped and upstream.type in SALTED_PROVIDER_TYPES:
        rewrite = rewriting(rewrite, without_transfers)
    return rewrite


def _note_usage(ctx, observer, body):
    """The stream's usage into C{ctx}; an event stream without one (cut before its usage came, or a
    passthrough's that asked for none) is estimated: its prompt from the request C{body}
    (L{prompt_estimate}: the upstream read it all, whatever was sent back) and its output tokens counted
    from the events sent (an observer may estimate them itself, in a usage it has: its C{estimated} says
    so)."""
    if observer.usage is not None:
        ctx.usage, ctx.estimated = observer.usage, getattr(observer, "estimated", False)
        return
    if ctx.stream and (ctx.usage is None or ctx.estimated):  # (or a stream before it that broke off)
        cut = getattr(observer, "cut_usage", None)  # (a passthrough's Messages stream: its message_start's count)
        if cut is not None and cut() is not None:
            ctx.usage, ctx.estimated = observer.usage, observer.estimated
            return
        events = getattr(observer, "events", 0)
        prompt = prompt_estimate(body)
        if prompt or events:
            ctx.usage, ctx.estimated = {"prompt_tokens": prompt, "completion_tokens": events}, True


# The error recorded of a stream the gateway cut itself, by what ended it (its client is told stream_incomplete).
_CUT_HERE = {ClientStalled: CLIENT_STALLED, StreamTooLong: STREAM_MAX_DURATION}
# The error of a stream whose upstream reported an error in it (an error event the client got) and ended it.
IN_STREAM_ERROR = "upstream_stream_error"
_USAGE = b'"usage":'
_BILLED_UNITS = b'"billed_units":'
_TOKENS = b'"tokens":'
TAP_TAIL = 64 * 1024
# The longest event a passthrough stream's tap holds until its end (L{UsageTap}), as the /v1 streams' framer does
# (L{MAX_EVENT_BYTES}): a longer one breaks the stream off, its client never handed part of an event.
HELD_EVENT = MAX_EVENT_BYTES
_EVENTS = re.compile(rb"(\r\n\r\n|\n\n|\r\r)")  # (an event's blank line, kept by split)
# A Messages stream's content delta, as its data names its type (once an event: a quote in a token is escaped)
_DELTA_TYPE = b'"content_block_delta"'
_EVENT_ENDS = (b"\n\n", b"\r\r")  # (the last two bytes of a stream whose last event is whole: most reads)


class StreamEnd:
    """The proper end of an event stream that has one, as a passthrough's tap looks for it (L{UsageTap}).

    @ivar kinds: the types its last event may have (bytes; C{[DONE]}: the data of OpenAI's last event).
    @ivar missing: how its error says a stream ended without it (C{"without [DONE]"}).
    """

    __slots__ = ("kinds", "missing")

    def __init__(self, kinds, missing):
        self.kinds = kinds
        self.missing = missing


# OpenAI's chat and text completions, Anthropic's Messages, the Responses API (a passthrough's other event streams
# have no end of their own: they end with their body).
DONE_END = StreamEnd((b"[DONE]",), "without [DONE]")
MESSAGES_END = StreamEnd((b"message_stop",), "before message_stop")
RESPONSES_END = StreamEnd(tuple(kind.encode() for kind in RESPONSE_END_TYPES), "before response.completed")
# The ends of the event streams an upstream may answer a call that asked for a whole answer with (by the call's path:
# L{gomodel.proxy.gather.BY_PATH}'s).
GATHERED_ENDS = {"/chat/completions": DONE_END, "/completions": DONE_END, "/messages": MESSAGES_END,
                 "/responses": RESPONSES_END}


@implementer(IStreamObserver)
class UsageTap:
    """Relays a body untouched (but for an event stream's error event naming its upstream: C{hide}), keeping its
    last L{TAP_TAIL} bytes to read its usage from at the end (a JSON answer's, or a stream's last usage chunk: read
    as soon as the stream's own end or error passes, where it has one, whether its body's end follows or not).

    Of an event stream it relays whole events only, the part of an event not yet ended held back until it
    ends (a client gets no event that a cut leaves broken: the error event comes after whole ones; an event
    longer than L{HELD_EVENT} breaks the stream off); it counts
    the events (of a Messages stream, its content deltas), the estimate of what a stream without a usage chunk made
    (as L{gomodel.proxy.sse.ChatStreamObserver} does), notes the first in-band error (L{error}: vLLM's error
    chunk, an C{error} event) and, where the stream has an end of its own (C{ends}), whether it came
    (L{done}). An end inside an event, or without that end, is no proper end (L{finish}): a body that ends
    with the connection (no length, not chunked) says nothing else of being cut short.
    """

    usage = None
    events = 0
    error = None
    done = False
    estimated = False  # its usage's output is the events relayed (L{_cut_short})
    # Of a Messages stream longer than the tail it keeps: its message_start's usage, kept as the tail first lost it
    # (False: it had none there), or None
    _started = None
    # What L{events} counts of what is relayed: each event's blank line; a Messages stream's content deltas (about a
    # token each, as vLLM streams them: not its message_start, block starts and stops, pings), their data's type
    _counted = b"\n\n"

    def __init__(self, stream=False, ends=None, hide=None):
        """
        @param stream: whether the body is an event stream.
        @param ends: the event stream's L{StreamEnd}, or None where it has none.
        @param hide: the upstream (a pool) whose addresses and key an error event of the stream must not name
            (L{gomodel.upstream.errors.hidden_in}: its name instead), or None.
        """
        self._hide = hide
        self._tail = bytearray()  # (appended to; cut back to L{TAP_TAIL} once it holds twice that: each byte
        self._stream = stream     # is copied about twice, where a new tail made per read copied 64 KiB each)
        self._ends = ends
        if ends is MESSAGES_END:
            self._counted = _DELTA_TYPE
        # The part of an event not relayed yet, as it came (joined once its end comes: each byte copied once,
        # where joining it on every read made a long event in small reads cost its size squared), its size, and
        # its last 3 bytes (where an end split between two reads begins).
        self._held = []
        self._held_size = 0
        self._seam = b""

    def feed(self, data: bytes) -> bytes:
        ended = False  # (this read holds the stream's end)
        if self._stream:
            data = self._whole(data)
            if not data:
                return data
            self.events += data.count(self._counted)
            erred = data.find(b'"error"') >= 0
            if erred and self.error is None:
                self.error = error_in(data)
                if self.error is not None:
                    self.done = ended = True  # (the client has the error: the stream's end, whatever follows)
            hide = self._hide
            # (an event naming the upstream, any event: its pool's marks, the one search a clean stream costs; an
            # error's address written with JSON's escapes names it too)
            if hide is not None and (hide.hidden_pattern.search(data) is not None or erred and data.find(b"\\u") >= 0):
                data = _errors_hidden(data, hide)
            if self.error is None and data.find(b"response.failed") >= 0:
                self.error = failure_in(data)  # (a failed response, the upstream's in-band error; the stream's end)
            if self._ends is not None and not self.done:
                for kind in self._ends.kinds:  # (its last mention: one in a token before its end is none)
                    at = data.rfind(kind)
                    if at >= 0 and event_kind(event_around(data, at)) == kind:
                        self.done = ended = True
        tail = self._tail
        tail += data
        if len(tail) > 2 * TAP_TAIL:
            if self._started is None and self._ends is MESSAGES_END:  # (the stream's first events go now)
                self._started = _start_usage(tail) or False
            del tail[:-TAP_TAIL]
        if ended:  # its usage now: a client may leave at the end (SDKs do), an upstream hold its body open past it
            last = bytes(tail[-TAP_TAIL:])
            self._ended_usage(last, usage_of(last))
        return data

    def _whole(self, data: bytes) -> bytes:
        """What came (after what was held) up to the end of its last whole event; the rest held until its event
        ends, but where it is blank (it passes).

        @raise StreamIncomplete: an event ran past L{HELD_EVENT} bytes.
        """
        start = 0  # (where an end may begin: none does in what was held)
        held = self._held
        if held:
            seam = self._seam
            if events_end(seam + data[:3]) == 0 and events_end(data) == 0:  # (the event goes on)
                self._hold(data, seam)
                return b""
            start = self._held_size - len(seam)
            held.append(data)
            data = b"".join(held)
            held.clear()
            self._held_size = 0
        elif data[-2:] in _EVENT_ENDS:
            return data
        end = events_end(data, start)
        rest = data[end:] if end else data
        if not rest or rest.isspace():
            return data
        self._hold(rest, b"")
        return data[:end]

    def _hold(self, part: bytes, seam: bytes):
        """Hold C{part} of the event not ended yet, after the part held so far (whose last 3 bytes are C{seam})."""
        size = self._held_size + len(part)
        if size > HELD_EVENT:
            raise StreamIncomplete("an upstream event exceeded %d bytes" % HELD_EVENT)
        self._held.append(part)
        self._held_size = size
        self._seam = (seam + part[-3:])[-3:]

    def next_sequence(self):
        """Of a Responses stream, the C{sequence_number} after the last event relayed (the gateway's own error
        event's: L{gomodel.http.render.ResponsesDialect}), or None where the tail it holds says none."""
        return sequence_after(self._tail) if self._ends is RESPONSES_END else None

    def finish(self):
        """Read the usage; of an event stream, raise L{StreamIncomplete} where it ended inside an event or,
        having an end of its own, without it."""
        tail, self._tail = bytes(self._tail[-TAP_TAIL:]), b""
        usage = usage_of(tail)
        if usage is not None or not self.done:  # (read at the stream's end: what followed it is no usage)
            self._ended_usage(tail, usage)
        if not self._stream:
            return
        if self._held:
            self._cut_short(tail)
            raise StreamIncomplete("the upstream stream ended inside an event")
        if self._ends is not None and not self.done:
            self._cut_short(tail)
            raise StreamIncomplete("the upstream stream ended " + self._ends.missing)

    def _ended_usage(self, tail: bytes, usage):
        """The C{usage} read from the C{tail} of a stream that ended (its own end or error passed, or its body ended)
        its usage; of a Messages stream its upstream's error event ended, before its message_delta, that of one cut
        short (L{_cut_short}): message_start's input, the content relayed as output, estimated."""
        self.usage, self.estimated = usage, False
        if self.error is not None and self._ends is MESSAGES_END:
            self._cut_short(tail)

    def cut_usage(self):
        """The usage of a Messages stream whose relay ended before its end without L{finish} (its client left, its
        upstream broke off), as L{finish} makes it of one cut short (L{_cut_short}), now its C{usage}; None for
        another stream, or one whose message_start did not come.

        (Called only where the stream has no usage: L{_note_usage}.)
        """
        if self._ends is not MESSAGES_END:
            return None
        tail = bytes(self._tail[-TAP_TAIL:])
        self.usage = usage_of(tail)
        self._cut_short(tail)
        return self.usage

    def _cut_short(self, tail: bytes):
        """A Messages stream cut, or ended by its upstream's error event, before its message_delta: the usage its
        tail holds is its message_start's (0 or 1 output tokens; of one longer than its tail, that kept,
        L{_started}), no final one, so its output is the content deltas relayed where more (estimated, as a stream
        without usage is). (A chat stream's usage chunk, and a Responses stream's final response, say the final
        usage.) A Responses stream keeps its C{tail}, whose last number the gateway's error event follows
        (L{next_sequence})."""
        if self._ends is RESPONSES_END:
            self._tail = tail
        if self._ends is not MESSAGES_END:
            return
        usage, started = self.usage, self._started
        if started:  # (a message_delta's after it, where one came, over it)
            usage = started if usage is None else {**started, **usage}
        if usage is None:
            return
        output = usage.get("output_tokens")
        output = output if output.__class__ is int else 0
        if output <= 1 and output < self.events:
            usage, self.estimated = dict(usage, output_tokens=self.events), True
        self.usage = usage


def _start_usage(events):
    """The usage of the C{message_start} event among C{events} (a Messages stream's first ones, a bytearray), or
    None."""
    at = events.find(b"message_start")
    if at < 0:
        return None
    return usage_of(event_around(bytes(events), at))


def _errors_hidden(events: bytes, upstream) -> bytes:
    """C{events} (whole ones) with those reporting an error (L{error_in}) written without C{upstream}'s addresses
    and key (L{hidden_in}), a Responses stream's failed response with its error so written (L{_failure_hidden}),
    and any other event naming them (its C{hidden_pattern}) written without them but for the model's words
    (L{_event_hidden}); every other event as it is."""
    parts = _EVENTS.split(events)  # (events and the blank lines between them, in turn)
    marks = upstream.hidden_pattern
    for i in range(0, len(parts), 2):
        part = parts[i]
        if part.find(b'"error"') >= 0 and error_in(part) is not None:
            parts[i] = hidden_in(part, upstream)
        elif marks.search(part) is not None:
            parts[i] = _event_hidden(part, upstream)
        elif part.find(b'"error"') >= 0 and part.find(b"response.failed") >= 0:
            parts[i] = _failure_hidden(part, upstream)  # (one writing it with JSON's escapes alone)
    return b"".join(parts)


# The members of an event's object (at any depth) that hold the model's words (and a client's): a chat or text
# chunk's choices, a Responses event's delta, text, arguments, refusal, logprobs, item, part and a response's output,
# a Messages event's delta, content block and content, a speech's audio, an image's: left as they are.
_WORDS = frozenset(("choices", "delta", "text", "arguments", "refusal", "logprobs", "item", "part", "output",
                    "content_block", "content", "audio", "b64_json", "partial_image_b64"))


def _event_hidden(event: bytes, upstream) -> bytes:
    """C{event} (without its blank line), an ordinary one naming C{upstream}'s addresses or key (an upstream's field
    echoing its own URL): written again with the strings of its data's object without them (L{without_address}),
    but for the model's words (L{_WORDS}; as it is where only those name them); its lines before its data without
    them too, and one whose data is no JSON object without them throughout (L{hidden_in})."""
    payload = event_object(event)
    if payload is None:
        return hidden_in(event, upstream)
    at = event.find(b"data:")
    head = event[:at]
    if upstream.hidden_pattern.search(head) is not None:
        head = hidden_in(head, upstream)
    shown = _said_hidden(payload, partial(without_address, upstream=upstream))
    if shown == payload:
        return head + event[at:]
    return head + b"data: " + jsonutil.dumps(shown)


def _said_hidden(value, hide, words=_WORDS):
    """C{value} (an event's JSON value) with C{hide} applied to every string in it, at any depth, but those under a
    member of the model's words (C{words})."""
    if value.__class__ is str:
        return hide(value)
    if value.__class__ is dict:
        return {key: item if key in words else _said_hidden(item, hide, words) for key, item in value.items()}
    if value.__class__ is list:
        return [_said_hidden(item, hide, words) for item in value]
    return value


def _failure_hidden(event: bytes, upstream) -> bytes:
    """C{event} (without its blank line) where it is a C{response.failed} whose response's C{error} names
    C{upstream}'s addresses or key: written again with that error without them (its other lines but those before
    its data left out, as L{gomodel.proxy.sse.ResponsesStreamObserver} does); else as it is."""
    payload = event_object(event)
    response = payload.get("response") if payload is not None and payload.get("type") == "response.failed" else None
    shown = error_shown(response, upstream)
    if shown is response:
        return event
    payload["response"] = shown
    return event[:max(event.find(b"data:"), 0)] + b"data: " + jsonutil.dumps(payload)


def uncoded(body: bytes, codings, limit: int):
    """C{body} without its C{Content-Encoding} C{codings} (the header's values: C{gzip}, C{x-gzip}, C{deflate},
    C{identity}, each undone in turn, last first), up to C{limit} bytes; None where one is none of those, or it is
    no such body, or it is larger uncompressed."""
    import zlib  # (here: libz is mapped only where an upstream compresses, gomodel.lean.leave_zlib_out)

    for coding in reversed([c.strip().lower() for value in codings for c in value.split(b",") if c.strip()]):
        if coding == b"identity":
            continue
        if coding in (b"gzip", b"x-gzip"):
            decoder = zlib.decompressobj(16 + zlib.MAX_WBITS)
        elif coding == b"deflate":  # (zlib's wrapper, as the RFC says; raw deflate, as some servers send it)
            decoder = zlib.decompressobj(zlib.MAX_WBITS if body[:1] == b"\x78" else -zlib.MAX_WBITS)
        else:
            return None
        try:
            body = decoder.decompress(body, limit + 1)
        except zlib.error:
            return None
        if len(body) > limit or decoder.unconsumed_tail:
            return None
    return body


def response_shown(body: bytes, upstream) -> bytes:
    """C{body}, a Responses object a passthrough answered whole, with its C{error} written without C{upstream}'s
    addresses and key (L{error_shown}), as a stream's failed response is (L{_failure_hidden}); else as it is (its
    output, the model's words, too)."""
    if upstream.hidden_pattern.search(body) is None and body.find(b"\\u") < 0:
        return body
    try:
        response = jsonutil.loads(body)
    except jsonutil.JSONError:
        return body
    shown = error_shown(response, upstream)
    return body if shown is response else jsonutil.dumps(shown)


# The members of a whole JSON answer (at any depth) that hold the model's or a client's words, beyond an event's
# (L{_WORDS}): vLLM's detokenized C{prompt}, C{tokenize}'s C{token_strs}, a rendered conversation's C{messages}, a
# reranked C{document}, a transcript's C{words}: left as they are.
_SAID = _WORDS | {"prompt", "token_strs", "messages", "conversation", "document", "words"}


def answer_shown(body: bytes, upstream) -> bytes:
    """C{body}, a passthrough's whole 2xx JSON answer (a vLLM's C{kv_event_sources} naming its publishers' host, a
    completion's C{kv_transfer_params} its engine's), with each string of it that names C{upstream}'s addresses or
    key written without them (L{without_address}) but for the model's and client's words (L{_SAID}); one that is no
    JSON without them throughout (L{hidden_in}); else byte for byte (one search finds those that name none)."""
    if upstream.hidden_pattern.search(body) is None and body.find(b"\\u") < 0:
        return body
    try:
        value = jsonutil.loads(body)
    except jsonutil.JSONError:
        return hidden_in(body, upstream)
    shown = _said_hidden(value, partial(without_address, upstream=upstream), _SAID)
    return body if shown == value else jsonutil.dumps(shown)


def metadata_usage(response):
    """The usage in an answer's C{metadata} header, or None: vLLM's embeddings and pooling with C{encoding_format}
    C{"bytes"} answer with the vectors alone, everything else (their places, the usage) in that header."""
    values = plain_headers(response.headers).get(METADATA)
    return usage_of(values[0]) if values else None


def binary_usage(response, counted) -> tuple:
    """C{(usage, estimated)} of an answer whose body says none: the usage in its C{metadata} header (vLLM's binary
    embeddings and pooling, C{encoding_format} C{"bytes"}), else, for C{"bytes_only"} (no header: no usage at all),
    answered, the prompt the upstream read, estimated from the request C{counted} (L{prompt_estimate}); else
    C{(None, False)}."""
    usage = metadata_usage(response)
    if usage is None and response.code < 300 and counted and b'"bytes_only"' in counted:
        prompt = prompt_estimate(counted)
        if prompt:
            return {"prompt_tokens": prompt}, True
    return usage, False


def usage_of(body: bytes):
    """The top-level C{usage} object of a JSON answer, or None; the bytes are not changed. An answer without
    one, Cohere's embed, has it as C{meta.billed_units} (Cohere's API) or C{meta.tokens} (vLLM's C{/v2/embed}),
    with C{input_tokens}.

    Only the object itself is parsed, not the whole answer (an embeddings
    answer is mostly numbers): a quote inside a JSON string is escaped, so
    the text C{"usage":} is a key, and the answer's own usage is its last.
    """
    at = body.rfind(_USAGE)
    cohere_tokens = False
    if at >= 0:
        start = at + len(_USAGE)
    else:
        at = body.rfind(_BILLED_UNITS)  # (only an answer without usage looks: one more scan, in C)
        if at >= 0:
            start = at + len(_BILLED_UNITS)
        else:
            at = body.rfind(_TOKENS)  # (a count only where it has input_tokens: not /tokenize's list, say)
            if at < 0:
                return None
            start, cohere_tokens = at + len(_TOKENS), True
    while body[start:start + 1] in (b" ", b"\n", b"\r", b"\t"):
        start += 1
    if body[start:start + 1] != b"{":
        return None  # null, or not an object
    end = body.find(b"}", start)
    while end >= 0:
        part = body[start:end + 1]
        # Where its braces balance (else a nested object, token details, ends here: the next brace);
        # parsed only then, since a failed parse costs an exception. Most are flat: one search says so.
        if part.find(b"{", 1) < 0 or part.count(b"{") == part.count(b"}"):
            try:
                usage = jsonutil.loads(part)
            except jsonutil.JSONError:
                pass  # a brace inside a string: the next one
            else:
                if not isinstance(usage, dict) or cohere_tokens and "input_tokens" not in usage:
                    return None
                return usage
        end = body.find(b"}", end + 1)
    return None
