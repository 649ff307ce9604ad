"""A service that refreshes something from the store at a steady interval while it runs."""

from twisted.application.service import Service
from twisted.internet.task import LoopingCall


class Periodic(Service):
    """Calls C{self.refresh()} at start and every C{interval} seconds on C{clock} until stopped.

    C{refresh} returns a Deferred and logs its own failures (a failure would stop the loop).
    """

    def __init__(self, clock, interval):
        self._clock = clock
        self._interval = interval
        self._loop = None

    def refresh(self):
        raise NotImplementedError

    def startService(self):
        super().startService()
        self._loop = LoopingCall(self.refresh)
        self._loop.clock = self._clock
        self._loop.start(self._interval, now=True)

    def stopService(self):
        super().stopService()
        if self._loop is not None and self._loop.running:
            self._loop.stop()
