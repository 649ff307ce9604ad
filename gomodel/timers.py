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
        now = self._clock.seconds() + _EARLY
        due = [timeout for timeout in self._pending if timeout.time <= now]
        calls = [(timeout._call, self._pending.pop(timeout)) for timeout in due]
        for timeout in due:
            timeout._timers = None
        if self._pending:
            self._set(min(timeout.time for timeout in self._pending))
        for function, args in calls:
            try:
                function(*args)
            except Exception:
                self.log.failure("a timeout's call failed")

    def stopService(self):
        super().stopService()
        if self._timer is not None:
            self._timer.cancel()
        self._timer = self._at = None
        for timeout in self._pending:
            timeout._timers = None
        self._pending.clear()
