"""Timeouts by the thousand on one reactor timer.

Every relayed request arms two timeouts (the upstream's answer, then its
body) that almost never fire. The reactor's own C{callLater} makes a
C{DelayedCall} and puts it in a heap for each, and cancelling takes it out
again: about a hundred and fifty Python bytecodes per timeout, a few per cent
of a request. L{Timers} keeps the pending ones in a dict instead, with one
reactor timer set for the earliest: arming one is a dict insert, cancelling a
dict delete. When the timer fires it calls the due ones and sets itself for
the next; one whose timeout was cancelled first is found without anything to
do and set again (with timeouts alike, about once per timeout's length).
"""

from twisted.application.service import Service
from twisted.logger import Logger


# Seconds early a timeout may fire: the timer set for it may come a rounding error before its time.
_EARLY = 1e-6


class _Timeout:
    """A pending call of L{Timers}: what C{callLater} returns (C{active}, C{cancel}, as a C{DelayedCall})."""

    __slots__ = ("time", "_timers", "_call")

    def __init__(self, timers, time, call):
        self.time = time
        self._timers = timers
        self._call = call

    def active(self) -> bool:
        return self._timers is not None

    def cancel(self):
        """Drop it (nothing happens if it fired or was cancelled already)."""
        timers = self._timers
        if timers is not None:
            self._timers = None
            del timers._pending[self]


def _time(timeout) -> float:
    return timeout.time


class Timers(Service):
    """C{callLater} for timeouts, on C{clock}: exact to the clock, one reactor timer for all (see the module).

    Its C{seconds} and C{callLater} are the clock's that timeouts use (what
    L{gomodel.upstream.client.within} asks of a clock). Stopping it (the
    gateway's last step, after the drain) cancels what is pending.
    """

    log = Logger()

    def __init__(self, clock):
        self._clock = clock
        self._pending = {}  # _Timeout -> (function, args), in the order armed
        self._timer = None  # the clock's DelayedCall, set for _at
        self._at = None

    def seconds(self) -> float:
        return self._clock.seconds()

    def callLater(self, seconds, function, *args) -> _Timeout:
        """Call C{function(*args)} in C{seconds} unless it is cancelled first.

        @return: the pending call (C{active()}, C{cancel()}).
        """
        at = self._clock.seconds() + seconds
        timeout = _Timeout(self, at, function)
        self._pending[timeout] = args
        if self._at is None or at < self._at:
            self._set(at)
        return timeout

    def _set(self, at):
        if self._timer is not None:
            self._timer.cancel()
        self._at = at
        self._timer = self._clock.callLater(max(0.0, at - self._clock.seconds()), self._fire)

    def _fire(self):
        self._timer = self._at = None
        pending = self._pending
        now = self._clock.seconds() + _EARLY
        due = [timeout for timeout in pending if timeout.time <= now]
        if len(due) > 1:
            due.sort(key=_time)  # (in time order, as the reactor would call them; those alike, as armed)
        for timeout in due:
            if timeout._timers is None:  # cancelled by the call of one due before it: it never fires
                continue
            timeout._timers = None
            args = pending.pop(timeout)
            try:
                timeout._call(*args)
            except Exception:
                self.log.failure("a timeout's call failed")
        if pending:
            at = min(timeout.time for timeout in pending)
            if at != self._at:  # (a call may have armed the earliest one, and set the timer for it)
                self._set(at)

    def stopService(self):
        super().stopService()
        if self._timer is not None:
            self._timer.cancel()
        self._timer = self._at = None
        for timeout in self._pending:
            timeout._timers = None
        self._pending.clear()
