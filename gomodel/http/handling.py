"""A route's handler, a coroutine, run to its end without a Deferred of its own.

C{Deferred.fromCoroutine} makes a Deferred for the coroutine, a second one
ready for its cancellation, a copy of the contextvars context it runs in, and
runs that Deferred's callbacks when the coroutine returns; each resumption
goes through the general loop of C{inlineCallbacks}. A relayed request's
handler awaits one Deferred (the upstream's answer) and ends: L{Handling}
does for it what that machinery does (resume where it waits, with the result
or the failure, and cancel what it waits on) and hands its outcome to one
function. About 300 Python steps less per request. The gateway's code sets
no context variable, so nothing reads the copy Twisted would have made.
"""

from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

from gomodel._twistedcompat import WaitedDeferred

# The Deferreds a handler awaits on the request path, known by their class at once: isinstance of a Deferred
# subclass's instance (an upstream's answer is a WaitedDeferred) goes through its ABC's __instancecheck__, in Python.
_DEFERREDS = frozenset((Deferred, WaitedDeferred))


class Handling:
    """Runs a coroutine (which awaits only Deferreds) given to L{start} and calls C{done(outcome, arg)}
    once, with what it returns or a L{Failure} of what it raised."""

    __slots__ = ("_coro", "_done", "_arg", "_waiting")

    def __init__(self, done, arg):
        self._coro = None
        self._done = done
        self._arg = arg
        self._waiting = None  # the Deferred it waits on

    def start(self, coro):
        """Run C{coro} until it first waits, or to its end."""
        self._coro = coro
        self._resume(None)

    def cancel(self):
        """Cancel the Deferred it waits on, as cancelling C{Deferred.fromCoroutine}'s would: the
        coroutine gets that Deferred's outcome (its canceller's, else a C{CancelledError}) where
        it waits. Nothing once it has ended, or while it runs."""
        waiting = self._waiting
        if waiting is not None:
            waiting.cancel()

    def _resume(self, result):
        """Go on with C{result}, the outcome of the Deferred awaited (None to begin), until it waits
        on a Deferred not yet fired or ends. A callback: fires with None."""
        self._waiting = None
        coro = self._coro
        try:
            if isinstance(result, Failure):
                awaited = result.throwExceptionIntoGenerator(coro)
            else:
                awaited = coro.send(result)
        except StopIteration as e:
            self._done(e.value, self._arg)
            return None
        except BaseException:
            self._done(Failure(), self._arg)
            return None
        # What an await of a Deferred yields: the Deferred, not fired yet (or paused). Anything else
        # (an asyncio future) cannot be waited on here: the coroutine hears so where it waits.
        if awaited.__class__ not in _DEFERREDS and not isinstance(awaited, Deferred):
            return self._resume(Failure(TypeError(f"a route's handler awaited {awaited!r}, not a Deferred")))
        self._waiting = awaited
        awaited.addBoth(self._resume)
        return None
