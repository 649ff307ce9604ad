"""Records held for a moment and handed over together: one write for all those of that moment; and
a read that looks again for what another process may still hold."""

from twisted.internet.task import deferLater


class Held:
    """Records held up to C{delay} seconds after the first of them, then handed to C{hand_over} in one list.

    @param clock: an C{IReactorTime}.
    @param hand_over: called with the list of records held, oldest first (on the reactor thread).
    """

    def __init__(self, clock, delay, hand_over):
        self._clock = clock
        self._delay = delay
        self._hand_over = hand_over
        self._records = []
        self._timer = None

    def add(self, record):
        """Hold C{record}, to be handed over within the delay."""
        self._records.append(record)
        if self._timer is None:
            self._timer = self._clock.callLater(self._delay, self.flush)

    def flush(self):
        """Hand over the records held now, if any (before their delay ran out: a read that must see them,
        a stop)."""
        if self._timer is not None:
            if self._timer.active():
                self._timer.cancel()
            self._timer = None
        if self._records:
            records, self._records = self._records, []
            self._hand_over(records)


async def looked_again(found, read, clock, waits):
    """C{found}, or, while it is None, what C{read()} (a Deferred) finds after each of C{waits}
    (seconds, in turn, on C{clock}): another process may hold the record for a moment (L{Held}), or
    be committing it. Fires with None when it never turns up."""
    for wait in waits:
        if found is not None:
            break
        await deferLater(clock, wait, lambda: None)
        found = await read()
    return found
