"""Readiness and the graceful stop.

On SIGTERM or SIGINT the gateway drains: its listeners close (new
connections are refused), C{/health/ready} answers 503 on connections still
open, each connection still open closes after its answer in progress or its
next one (which says C{Connection: close}), requests (those whose body is
still arriving too, and those read whole waiting for their managed key to be
read from the store) and streams in flight go on for up to C{SHUTDOWN_TIMEOUT},
and the answers written go on reaching their clients within it (a whole answer
a slow client has not read yet is not cut off by the stop), after which the
connections left idle close (a request sent on one would come as the services stop);
what is left then is cut (its upstream connections close, so vLLM aborts):
a request whose answer had not started gets a 503 (L{gomodel.errors.ShuttingDown})
and its connection closes after it (after those pipelined behind it, which get it too; a background response's
create is waited for L{BACKGROUND_GRACE} more first), an event stream ends with its error event,
as one an upstream broke off does; both are recorded as the gateway's cut
(L{CUT}), not as a client that left.
Batch work starts nothing once the drain begins, and its lines in flight are waited for too (L{Drain.background}),
a batch whose last lines they were concluded.
Only then do the services stop (usage flushed, batch work released to resume
at the next start), and the process exits with status 0, not twistd's
signal status; another signal meanwhile changes nothing
(L{gomodel._twistedcompat.stop_once_on_signals}).
"""

from functools import partial

from twisted.internet.defer import Deferred, DeferredList, maybeDeferred, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure

from gomodel import _twistedcompat
from gomodel.errors import ShuttingDown, StreamFailed
from gomodel.http import render
from gomodel.http.headers import is_event_stream

# The error code of a request the drain cut when its time ran out (SHUTDOWN_TIMEOUT).
CUT = ShuttingDown.code
# Seconds the connections cut get to close and their requests to be recorded before the services stop anyway.
CUT_GRACE = 1.0
# Seconds a background response's create whose answer had not started when the drain ran out of time is still
# waited for (vLLM answers it queued as soon as it runs it): cut then, it would run at its instance unwatched,
# never charged, while its client, told 503, made it again.
BACKGROUND_GRACE = 5.0
# Seconds between two looks, once no request is in flight, at whether the connections still hold answer bytes
# their clients have not read (L{Drain._written}); only while draining.
UNSENT_POLL = 0.05


class Drain:
    """Counts requests in flight and waits for them when the gateway stops.

    A request-context start hook (L{started}) and sink (L{__call__}).
    """

    log = Logger()
    reads_usage = False  # it only counts

    site = None  # the GatewaySite whose connections a drain that ran out of time closes

    def __init__(self, reactor, listeners, timeout):
        """
        @param listeners: the L{gomodel.listeners.ListenerService}s to close first.
        @param timeout: seconds requests in flight get before they are cut.
        """
        self._reactor = reactor
        self._listeners = listeners
        self._timeout = timeout
        self.live = set()  # the contexts of the requests in flight (the metrics' gomodel_requests_in_flight)
        # The requests no route has seen yet a drain waits for (L{_count_unread}): their body arriving, or read whole
        # while who sent them is looked up (a managed key this process lacks: C{held}).
        self._unread = set()
        # What the drain starts and lets finish within its time too (L{background}): each a function that stops
        # starting work and returns a Deferred firing once the work under way is done (the batch runner's
        # L{gomodel.batches.runner.BatchRunner.drain}); C{_work}, the Deferreds not fired yet.
        self.background = []
        self._work = set()
        self.draining = False
        self._idle = None
        self._look = None  # the next look at the bytes not yet sent (L{_written}), while one is due

    @property
    def in_flight(self) -> int:
        """The requests in flight now."""
        return len(self.live) + len(self._unread)

    def started(self, ctx):
        self.live.add(ctx)

    def __call__(self, ctx):
        self.live.discard(ctx)
        if self._idle is not None and not self.live and not self._unread and not self._work:
            self._written()

    def _written(self):
        """Fire the drain's Deferred once the client connections hold no answer bytes not yet handed to the kernel
        (a whole answer written at once, its client reading it slowly: the reactor's stop, after the services',
        closes every connection at once, which would cut it); else look again in L{UNSENT_POLL} seconds."""
        self._look = None
        if self._idle is None or self.live or self._unread or self._work:  # (a kept-alive connection's next request
            # meanwhile; batch lines in flight)
            return  # (its end looks again)
        if self.site is not None and self._count_unread():  # a request whose head came meanwhile (a kept-alive
            return  # connection's last): its end looks again
        if self._unsent():
            self._look = self._reactor.callLater(UNSENT_POLL, self._written)
            return
        idle, self._idle = self._idle, None
        self._ended()
        idle.callback(None)

    def _ended(self):
        """Nothing is in flight any more: close the connections left idle (a request sent on one now would come
        as the services stop)."""
        if self.site is not None:
            self.site.close_idle()

    def _unsent(self) -> bool:
        """Whether a client connection holds bytes not yet handed to the kernel."""
        return self.site is not None and any(_twistedcompat.unsent(channel.transport)
                                             for channel in self.site.channels)

    def _stop_looking(self):
        if self._look is not None and self._look.active():
            self._look.cancel()
        self._look = None

    def drain(self) -> Deferred:
        """Stop listening, wait for what is in flight (at most the timeout), cut the rest.

        @return: a Deferred firing with None once nothing is in flight.
        """
        if self.draining:
            return succeed(None)
        self.draining = True
        closing = [d for d in (listener.stopListening() for listener in self._listeners) if d is not None]
        # Said once the ports are closed (Twisted closes a port's socket on the reactor's next turn: until
        # then the kernel still completes new connections), so that the line means what it says.
        DeferredList(closing, consumeErrors=True).addCallback(self._closed)
        if self.site is not None:
            self.site.close_after_answers()  # kept-alive connections move to other hosts
            self._count_unread()
        for stop in self.background:
            self._start_draining(stop)
        _twistedcompat.exit_cleanly(self._reactor)
        if self.in_flight == 0 and not self._work and not self._unsent():
            self._ended()
            return succeed(None)
        self._idle = Deferred()
        self._idle.addTimeout(self._timeout, self._reactor, onTimeoutCancel=self._cut)
        if self.in_flight == 0 and not self._work:  # (answers still being sent)
            self._written()
        return self._idle

    def _start_draining(self, stop):
        """Tell background work to start nothing more (C{stop}, one of L{background}); the drain waits for what
        it has under way (at most the timeout: the services' stop cuts the rest)."""
        d = maybeDeferred(stop)
        if d.called:  # (nothing under way)
            d.addErrback(self._work_failed)
            return
        self._work.add(d)
        d.addErrback(self._work_failed)
        d.addBoth(self._work_done, d)

    def _work_failed(self, failure):
        self.log.failure("drain: waiting for the background work failed", failure)

    def _work_done(self, _, d):
        self._work.discard(d)
        self(None)

    def _count_unread(self) -> bool:
        """Count the requests whose head is in that L{started} has not seen yet (once each): their body arriving
        (an upload's), or read whole while who sent them is looked up (a managed key this process lacks: the
        request's C{held}). Each is in flight until it is answered or its connection is lost.

        @return: whether it counted any."""
        counted = False
        for channel in list(self.site.channels):
            for request in channel.requests:
                if (request.context is None and request not in self._unread
                        and not (channel._head_open and request is channel._receiving)):
                    counted = True
                    self._unread.add(request)
                    request.notifyFinish().addBoth(self._unread_done, request)
        return counted

    def _unread_done(self, _, request):
        self._unread.discard(request)
        self(None)

    def _closed(self, _):
        self.log.info("draining: new connections are refused; {count} requests in flight, waiting up to "
                      "{timeout:g}s", count=self.in_flight, timeout=self._timeout)

    def _cut(self, result, timeout):
        self._idle = None
        self._stop_looking()
        if self.in_flight:
            self.log.warn("drain: {count} requests still in flight after {timeout:g}s; closing them",
                          count=self.in_flight, timeout=timeout)
        elif self._work:
            self.log.warn("drain: batch lines still in flight after {timeout:g}s; the stop cuts them (they are "
                          "sent again when their batch resumes)", timeout=timeout)
        else:
            self.log.warn("drain: answers not yet read by their clients after {timeout:g}s; closing their "
                          "connections", timeout=timeout)
        spared = []  # background creates whose answer had not started: waited for (BACKGROUND_GRACE)
        if self.site is not None:
            closing = set()  # those closing after what they were just told (a 503, a stream's error event)
            for channel in list(self.site.channels):
                if self._cut_channel(channel, spared):
                    closing.add(channel)
                # A body still arriving (an upload's, or one pipelined behind the answer in progress: the
                # connection closes after that answer) is the gateway's cut, not a client gone.
                channel.lose_unread(ShuttingDown.status, CUT)
            self.site.abort_connections(spare=closing)
        if self.in_flight == 0:
            return None
        if spared:
            self.log.info("drain: waiting up to {grace:g}s for {count} background responses' creates to be answered",
                          grace=BACKGROUND_GRACE, count=len(spared))
            self._idle = Deferred()
            self._idle.addTimeout(BACKGROUND_GRACE, self._reactor, onTimeoutCancel=partial(self._cut_spared, spared))
            return self._idle
        return self._grace()

    def _cut_channel(self, channel, spared) -> bool:
        """Cut what C{channel}'s requests are at the drain's end (L{_cut_request}); a background create whose
        answer had not started is waited for instead (added to C{spared}). Requests read whole behind the answer
        in progress (pipelined) are refused (the 503) when their turn comes, the last one closing the connection;
        where it closes before their turn (a stream cut, an aborted answer), they are recorded as cut.

        @return: whether the connection closes by itself (after its answers), not to be aborted."""
        queued = list(channel._received)
        for request in queued:
            request.refuse_queued(ShuttingDown())
        closes = waited = False
        for request in list(channel.requests):
            if request in queued:
                continue
            if _spared(request):  # (its answer, then those queued behind it: their turn comes)
                spared.append(request)
                closes = waited = True
                if not queued:
                    request.close_after()
            elif _cut_request(request, last=not queued):
                closes = True
        if not waited:
            for request in queued:
                if request.context is None:  # (never answered: the connection closed before its turn)
                    self.site.lost_early(request, request.uri, ShuttingDown.status, CUT)
        return closes

    def _cut_spared(self, spared, result, timeout):
        """The background creates still not answered L{BACKGROUND_GRACE} after the drain's end are cut too."""
        self._idle = None
        self._stop_looking()
        for request in spared:
            channel = request.channel
            if request.finished or channel is None:
                continue
            if not _cut_request(request, last=not channel._received) and channel.transport is not None:
                channel.transport.abortConnection()
        if self.in_flight == 0:
            return None
        return self._grace()

    def _grace(self):
        """Wait for what was cut to be recorded (L{CUT_GRACE} at most)."""
        # An aborted connection closes on the reactor's next turn, and its request is recorded then (a stream's
        # usage, what it had sent): the services (the usage ledger) stop once that is done.
        self._idle = Deferred()
        self._idle.addTimeout(CUT_GRACE, self._reactor, onTimeoutCancel=self._stop_anyway)
        return self._idle

    def _stop_anyway(self, result, timeout):
        self._idle = None
        self._stop_looking()
        return None


def _cut_request(request, last=True) -> bool:
    """Cut C{request} at the end of the drain, recorded as the gateway's cut, error L{CUT}: a stream as broken
    (outcome C{stream_broken}, the status it sent); an answer not started is answered now, a 503
    L{ShuttingDown} (outcome C{error}) after which its connection closes. An event stream ends as one an
    upstream broke off does (C{stream_incomplete}, L{_end_stream}); any other answer that started has its
    connection aborted; one read whole that no route has seen yet, waiting for who sent it (its C{held}), is
    refused with the 503 now (in its route's dialect, recorded so). Either way its handler is cancelled (here, or
    by the abort), which closes its upstream connection, as a client that left would. Before, every connection was
    aborted: the client saw a reset, not an answer it could retry on, nor a stream's error event. Not C{last}
    (requests pipelined behind it, refused: L{Drain._cut}), its 503 leaves the connection open for theirs.

    @return: whether its connection closes by itself (after the 503 or the error event), not to be aborted.
    """
    ctx = getattr(request, "context", None)
    if ctx is None:  # no route saw it: one read whole, waiting for who sent it, is refused (the 503) now
        if getattr(request, "held", False):
            request.give_up(ShuttingDown())
            return True
        return False
    if ctx.outcome is not None:  # recorded already
        return False
    error = ShuttingDown()
    if request.startedWriting:
        ctx.broken(CUT)
        if is_event_stream(request.responseHeaders):
            return _end_stream(request, error)
        return False
    ctx.cut(CUT)
    _unrelayed(request)
    body = render.render(request, error, render.dialect_of(request))
    if last:
        request.close_after()
    request.write(body)
    _stop_handler(request, error)  # (which finishes the answer: L{gomodel.http.front.write_answer} of nothing more)
    if not request.finished:  # (no handler)
        request.finish()
    return True


def _spared(request) -> bool:
    """Whether C{request}, at the drain's end, is a background response's create whose answer has not started:
    waited for a moment more (L{BACKGROUND_GRACE}), not cut."""
    return request.background and not request.startedWriting and getattr(request, "context", None) is not None \
        and request.context.outcome is None


def _unrelayed(request):
    """Unregister the relay of a stream whose upstream sent only its head (none of it went out: the 503 goes out
    instead), and put back the answer's headers as they were before that head's were copied in."""
    relay = request.producer
    if relay is None:
        return
    request.unregisterProducer()
    before = getattr(relay, "head_before", None)
    if before is not None:
        headers = _twistedcompat.plain_headers(request.responseHeaders)
        headers.clear()
        headers.update(before)


def _stop_handler(request, error):
    """Record C{request} as a lost connection is (what it was cut as) and cancel its handler (its relay stops,
    its upstream connection closes, so vLLM aborts)."""
    ending, request.ending = request.ending, None
    if ending is not None:
        ending(Failure(error))


def _end_stream(request, error) -> bool:
    """End an event stream the drain cuts as one whose upstream broke off ends (L{gomodel.proxy.exchange}): its
    relay stopped, an in-band error event in the route's dialect, then its connection closed without the
    body's end, never made to look finished.

    @return: whether its connection closes by itself (L{_cut_request}'s).
    """
    observer = getattr(request.producer, "observer", None)  # (the relay's: a Responses stream's numbering)
    _stop_handler(request, error)
    if request.channel is None:
        return False
    request.unregisterProducer()
    request.write(render.dialect_of(request).stream_event(
        StreamFailed("The stream ended abnormally: the gateway is stopping."), observer))
    request.transport.loseConnection()
    return True


class Readiness:
    """What C{GET /health/ready} answers: ready, or the reasons it is not, and which dependency is down.

    A database or Redis that is down does not make the gateway unready:
    every host shares them, and requests that need neither (chat with the
    master key or a cached managed key) still flow; those that need the
    store get a C{storage_unavailable} 503. L{down} names what is down, so
    C{/health/ready} answers C{degraded} with it. A store still opening
    (its first attempt under way: migrations, another host's migration lock)
    is not ready: a host just started waits for it. A store this gateway can
    never use (its C{fatal}: a database a newer gateway migrated) does: only
    this host is refused.
    """

    def __init__(self, drain, registry, store, counters=None, pins=None):
        """
        @param store: the store service (its C{problem}: why it cannot be used now, or None).
        @param counters: the shared limit counters (L{gomodel.limits.counters.RedisCounters}), or None.
        @param pins: the shared session pins (L{gomodel.routing.pins.SharedPins}), or None.
        """
        self._drain = drain
        self._registry = registry
        self._store = store
        self._counters = counters
        self._pins = pins
        self._known = False
        registry.ready().addCallback(self._discovered)

    def _discovered(self, _):
        self._known = True

    def reasons(self) -> list:
        """Why the gateway should get no traffic now (empty when ready)."""
        reasons = []
        if self._drain.draining:
            reasons.append("draining: the gateway is stopping")
        if not self._known:
            reasons.append("model discovery has not finished")
        if not self._store.running:
            reasons.append("the store is not open")
        elif getattr(self._store, "opening", False):  # (its migrations running, another host's lock awaited)
            reasons.append("the store is opening")
        fatal = getattr(self._store, "fatal", None)
        if fatal is not None:  # (this host's alone, unlike an outage: its peers may serve what it cannot)
            reasons.append(f"the store cannot be used: {fatal}")
        return reasons

    def down(self) -> dict:
        """The dependencies that are down now: C{{"database" or "redis": what is wrong}}, empty when none."""
        down = {}
        problem = getattr(self._store, "problem", None)
        if problem is not None and self._store.running:
            down["database"] = f"{problem}: files, batches, stored responses, key and budget edits and usage " \
                               "are unavailable (503 storage_unavailable)"
        failing = [shared for shared in (self._counters, self._pins) if getattr(shared, "unreachable", False)]
        if failing:
            # (a client of the wrong kind for the server, REDIS_CLUSTER to set or unset, fails for good: said so)
            wrong = next((shared.misconfigured for shared in failing if getattr(shared, "misconfigured", None)),
                         None)
            down["redis"] = ("unreachable" if wrong is None else f"misconfigured ({wrong})") + \
                ": rate and concurrency limits are not enforced, budgets are judged by the usage ledger, and each " \
                "host keeps its own session pins"
        return down
