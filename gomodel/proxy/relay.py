"""The relay: one object that is the upstream body's protocol and the client's push producer.

When the client cannot keep up, Twisted pauses us and we pause the upstream
socket, so backpressure reaches vLLM through TCP and memory stays bounded.
When the client leaves, the upstream connection is closed at once so vLLM
aborts the generation (but for a background stream whose provider has not
named its response yet: L{StreamRelay._client_left}). (Twisted's C{protocols/portforward.py} is the model:
one object on both sides, pausing the other side's transport.)

Each upstream read is relayed at once, in the reactor turn that read it: the
upstream HTTP client hands over all the body one read brought in one delivery
(L{gomodel._twistedcompat.AnswerParser}: one per read, not one per event), which
is written to the client and handed to the kernel (a model's token reaches its
client as soon as it came; a burst read at once leaves in one write).
"""

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import Protocol
from twisted.web.client import ResponseDone
from twisted.web.http import PotentialDataLoss
from zope.interface import implementer

from gomodel._twistedcompat import fire_unwatched, send_now
from gomodel.interfaces import IStreamObserver


# How an upstream body ends properly (what the HTTP client's connectionLost gives: all of it, or a body without a
# length that ended with its connection).
_CLEAN_END = (ResponseDone, PotentialDataLoss)


class UpstreamIdle(Exception):
    """The upstream sent nothing for longer than the idle timeout."""


class ClientStalled(Exception):
    """The client read nothing for longer than the stall timeout."""


class StreamTooLong(Exception):
    """The stream ran past the configured maximum duration."""


class UpstreamLingered(Exception):
    """The upstream's body did not end within L{END_LINGER} of the stream's proper end (the client has it all)."""


# Seconds the upstream's body has to end once the stream's proper end went out; then the upstream is
# closed and the client's answer ends: the anthropic SDKs (and the openai SDK's Responses streams) read to
# the body's end, not to the last event, and would wait the idle timeout for an upstream that holds it open.
END_LINGER = 1.0


@implementer(IStreamObserver)
class _Passthrough:
    """The observer of a body that is relayed as it comes."""

    usage = None
    done = False  # (a body relayed as it comes has no proper end to see)

    def feed(self, data):
        return data

    def finish(self):
        pass


@implementer(IPushProducer)
class StreamRelay(Protocol):
    """Relays an upstream body to C{request}, chunk for chunk, with flow control.

    L{finished} fires with None when the upstream body ended properly, or
    fails with the reason it did not (C{ResponseFailed}, L{UpstreamIdle},
    L{ClientStalled}, L{StreamTooLong}, or what the observer's C{finish}
    raises; L{UpstreamLingered}, the upstream closed, when its body did not
    end within L{END_LINGER} of the stream's proper end). Cancelling it
    closes the upstream connection, as the client's leaving does, unless its
    observer reads on (L{_client_left}).
    """

    # (the state every relay starts in, set here once rather than per stream in __init__)
    observer = _Passthrough()  # (its own state is none: one serves every relay without an observer)
    paused = False
    client_gone = False
    upstream_done = False
    end_written = False
    wrote = False  # some of the body went to the client (its head with it; what the observer dropped is none)
    rejected = False  # the observer refused what the upstream sent (an event that is none)
    # the answer's headers before its upstream's head was copied in (put back where that head never goes out)
    head_before = None
    _idle_call = None
    _heard = 0.0  # when the upstream last sent bytes (the idle timer looks at it when it fires)
    _stall_call = None
    _max_call = None
    _end_call = None  # once the stream's end went out: when the upstream's body must have ended
    _ping_call = None  # an observer with a keepalive: when to look at the upstream's silence (L{_keepalive_check})
    _reading_on = False  # its client left, and its observer reads on (L{_client_left})
    # with an observer, bytes -> bytes: what the client gets of each of its outputs (whole events: a
    # L{gomodel.proxy.renamed.ModelNamed}, L{gomodel.proxy.transfers.without_transfers}), or None; set after the
    # relay is made (a keyword more to a class's call costs a dict entry in CPython 3.11, every stream)
    rewrite = None

    def __init__(self, request, clock, observer=None, *, idle_timeout=0.0, stall_timeout=0.0, max_duration=0.0,
                 first_write=None, end_written=None, timers=None):
        """
        @param observer: an L{IStreamObserver}; None relays the bytes as they come.
        @param timers: what the idle timeout, the maximum duration and the wait for the upstream's body to end
            after the stream's end run on (the gateway's L{gomodel.timers.Timers}: timeouts that almost never
            fire, armed and cancelled once per stream, without a reactor timer each); C{clock} when None.
        @param first_write: called once, when the first bytes are written to the client.
        @param end_written: called once, when the bytes holding the stream's proper end
            (the observer's C{done} turned true: C{[DONE]}, C{response.completed},
            C{message_stop}) were written to the client.
        """
        timers = timers if timers is not None else clock
        # (one store each, not __dict__ assigned whole: such an instance keeps a dict of its own, and each read
        # of a class default above, several every upstream read, then takes CPython's unspecialized path)
        self._request = request
        self._first_write = first_write
        self._end_written = end_written
        self._clock = clock
        self._timers = timers
        self._idle_timeout = idle_timeout
        self._stall_timeout = stall_timeout
        self.finished = Deferred(self._cancelled)
        if observer is not None:
            self.observer = observer
        if max_duration:
            self._max_call = timers.callLater(max_duration, self._fail, StreamTooLong())

    # -- upstream side (IProtocol) -------------------------------------------

    def connectionMade(self):
        self._heard = self._clock.seconds()
        self._arm_idle(self._idle_timeout)
        keepalive = getattr(self.observer, "keepalive", None)
        if keepalive:
            self._ping_call = self._timers.callLater(keepalive, self._keepalive_check)

    def dataReceived(self, data):
        """Relay what one upstream read brought (the HTTP client's one delivery of it), and hand it to the kernel."""
        if self.finished.called:
            if self._reading_on:
                self._read_on(data)
            return
        self._heard = self._clock.seconds()
        try:
            out = self.observer.feed(data)
        except Exception as e:
            self.rejected = True
            self._fail(e)
            return
        if out:
            if self.rewrite is not None:
                out = self.rewrite(out)
            if not self.wrote:
                self._wrote_first()
            request = self._request
            request.write(out)
            if not self.end_written and self.observer.done:
                self._wrote_end()
            send_now(request.transport)

    def relay_whole(self, body):
        """Relay C{body}, the upstream's whole body, come with its head (a short stream: L{gomodel._twistedcompat.
        whole_body}), in one write, then end as L{connectionLost} ends it: no transport to pause, nor an idle
        timer, nor a wait for the body's end after the stream's (nothing more can come). L{finished} has fired
        when it returns.

        The observer is finished before the write: where the stream ended properly, the answer's end goes out
        with its bytes (where the request's C{write} takes C{last}: one send, not two); where it did not,
        what came goes out first, then L{finished} fails, as a body that ended short fails it."""
        self.upstream_done = True
        if self._max_call is not None:  # (the one timer it may have: no idle timer, nor a wait for the body's end)
            self._cancel_timers()
        observer = self.observer
        try:
            out = observer.feed(body) if body else None
        except Exception as e:  # (what came was refused)
            self.rejected = True
            self.finished.errback(e)
            return
        try:
            observer.finish()
            ended = None
        except Exception as e:
            ended = e
        if out:  # (L{dataReceived}'s bookkeeping, for a first write that is also the last)
            if self.rewrite is not None:
                out = self.rewrite(out)
            self._wrote_first()
            request = self._request
            if ended is None and getattr(request, "write_takes_last", False):
                request.write(out, True)
            else:
                request.write(out)
            if observer.done:
                self._wrote_end()
        if ended is None:
            fire_unwatched(self.finished)  # (nothing has added a callback yet)
        else:
            self.finished.errback(ended)

    def _wrote_first(self):
        """The first bytes of the body went to the client."""
        self.wrote = True
        if self._first_write is not None:
            self._first_write()
            self._first_write = None

    def _wrote_end(self):
        """The bytes holding the stream's proper end went to the client: the upstream's body has L{END_LINGER}
        to end."""
        self.end_written = True
        if self._end_written is not None:
            self._end_written()
        if not self.upstream_done:
            self._end_call = self._timers.callLater(END_LINGER, self._lingered)

    def _lingered(self):
        self._end_call = None
        self._fail(UpstreamLingered())

    def connectionLost(self, reason):
        self.upstream_done = True
        self._cancel_timers()
        if not self.finished.called:
            self._ended(reason)
        if self._reading_on:
            self.observer.read_on_over()

    def _ended(self, reason):
        """The upstream's body ended (C{reason}): L{finished} fires, or fails if it did not end properly."""
        if isinstance(reason.value, _CLEAN_END):  # (not Failure.check: its walk of the class's bases, per stream)
            try:
                self.observer.finish()
            except Exception as e:
                self.finished.errback(e)
                return
            self.finished.callback(None)
        else:
            self.finished.errback(reason)

    # -- client side (IPushProducer) -------------------------------------------

    def pauseProducing(self):
        if self.paused:
            return
        self.paused = True
        if self.transport is not None:
            self.transport.pauseProducing()
        # Our own backpressure is not upstream silence.
        self._cancel(self._idle_call)
        self._idle_call = None
        if self._stall_timeout and not self.finished.called:
            self._stall_call = self._clock.callLater(self._stall_timeout, self._fail, ClientStalled())

    def resumeProducing(self):
        if not self.paused:
            return
        self.paused = False
        self._cancel(self._stall_call)
        self._stall_call = None
        if self.transport is not None:
            self.transport.resumeProducing()
        if not self.upstream_done:
            self._heard = self._clock.seconds()  # our own pause was no upstream silence
            self._arm_idle(self._idle_timeout)

    def stopProducing(self):
        """The client connection is gone."""
        self.client_gone = True
        self._client_left()

    # -- ending ----------------------------------------------------------------

    def _cancelled(self, finished):
        self._client_left()

    def _client_left(self):
        """The client left (its connection is gone, or its request's wait for L{finished} was cancelled): close
        the upstream connection, unless the observer's C{left()} (one that has it) says it reads on (a background
        stream whose provider names its response in an event still to come): its reads then go to the observer
        alone until it is C{named()}, or its upstream ends (its idle timeout and maximum duration still hold),
        which tells the observer (C{read_on_over()}). Called again once reading on, it closes the upstream where
        the observer is named meanwhile."""
        if self._reading_on:
            if self.observer.named():
                self.abort_upstream()
            return
        left = None if self.upstream_done else getattr(self.observer, "left", None)
        if left is None or not left():
            self.abort_upstream()
            return
        self._reading_on = True
        if self.paused:  # (its client's backpressure is gone with it)
            self.paused = False
            self._cancel(self._stall_call)
            self._stall_call = None
            if self.transport is not None:
                self.transport.resumeProducing()
            self._heard = self._clock.seconds()
            self._arm_idle(self._idle_timeout)

    def _read_on(self, data):
        """Give C{data}, read after the client left, to the observer alone; the upstream is closed once it is
        named (or refused what came)."""
        self._heard = self._clock.seconds()
        try:
            self.observer.feed(data)
            named = self.observer.named()
        except Exception:
            named = True
        if named:
            self.abort_upstream()

    def abort_upstream(self):
        """Close the upstream connection (idempotent) so the upstream stops generating."""
        self._cancel_timers()
        if self.transport is not None and not self.upstream_done:
            # The body transport has no abortConnection; stopProducing closes
            # the connection and keeps it out of the pool.
            self.transport.stopProducing()

    def _fail(self, exc):
        if self.finished.called:
            if self._reading_on:  # (read on after its client left: its idle timeout, its maximum duration)
                self.abort_upstream()
            return
        self.abort_upstream()
        self.finished.errback(exc)

    def shorten_idle(self, seconds):
        """Its upstream went down: from now on it may be silent for at most C{seconds} (where its idle timeout
        is longer, or none), counted from its last bytes, and looked at now."""
        if self.finished.called or self.upstream_done or 0 < self._idle_timeout <= seconds:
            return
        self._idle_timeout = seconds
        if not self.paused:  # (paused, its timer is armed again as the client reads)
            self._cancel(self._idle_call)
            self._idle_check()

    def _arm_idle(self, seconds):
        """Look at the upstream's silence in C{seconds} (L{_idle_check}): one timer, never reset as bytes come."""
        if self._idle_timeout and not self.paused:
            self._idle_call = self._timers.callLater(seconds, self._idle_check)

    def _keepalive_check(self):
        """An observer with a C{keepalive} (seconds) and an C{idle()} (the bytes to send while the upstream is
        silent: Anthropic's C{ping}, or None): once the upstream was silent that long, write them, and again each
        C{keepalive} of silence after, until the stream is over, its client gone or paused (its backpressure).
        What the observer relays is whole events, so they go between two. They are no upstream bytes: the idle
        timeout still counts the upstream's silence."""
        self._ping_call = None
        if self.finished.called or self.client_gone:
            return
        observer = self.observer
        keepalive = observer.keepalive
        silent = self._clock.seconds() - self._heard
        if silent >= keepalive:
            out = None if self.paused or observer.done else observer.idle()
            if out:
                if not self.wrote:
                    self._wrote_first()
                self._request.write(out)
                send_now(self._request.transport)
            silent = 0.0
        self._ping_call = self._timers.callLater(keepalive - silent, self._keepalive_check)

    def _idle_check(self):
        self._idle_call = None
        silent = self._clock.seconds() - self._heard
        if silent < self._idle_timeout:
            self._arm_idle(self._idle_timeout - silent)  # bytes came meanwhile: look again when it would run out
        else:
            self._fail(UpstreamIdle())

    @staticmethod
    def _cancel(call):
        if call is not None and call.active():
            call.cancel()

    def _cancel_timers(self):
        """Cancel what is pending; most streams end with only the idle timer armed (the others None)."""
        idle, stall, most, end = self._idle_call, self._stall_call, self._max_call, self._end_call
        if idle is not None:
            self._idle_call = None
            idle.cancel()  # (pending: L{_idle_check} forgets it as it fires)
        if stall is not None or most is not None:
            for call in (stall, most):
                self._cancel(call)
            self._stall_call = self._max_call = None
        if end is not None:  # (still pending: L{_lingered} forgets it as it fires)
            self._end_call = None
            end.cancel()
        ping = self._ping_call
        if ping is not None:  # (still pending: L{_keepalive_check} forgets it as it fires)
            self._ping_call = None
            ping.cancel()
