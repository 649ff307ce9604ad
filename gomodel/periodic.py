"""Services that do something at a steady interval while they run."""

from twisted.application.service import Service
from twisted.internet.task import LoopingCall
from twisted.logger import Logger


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


class Repeating(Service):
    """Calls C{call()} at start and every C{step} seconds on C{clock} until stopped; stopping waits for
    a call in progress (a Deferred it returned).

    Twisted's C{TimerService}, without loading C{twisted.application.internet}
    (and the state-machine library its client services bring) for it.
    """

    log = Logger()

    def __init__(self, step, call, clock=None):
        self.step = step
        self.call = call
        self.clock = clock
        self._loop = None
        self._finished = None

    def startService(self):
        super().startService()
        self._loop = LoopingCall(self.call)
        if self.clock is not None:
            self._loop.clock = self.clock
        self._finished = self._loop.start(self.step, now=True)
        self._finished.addErrback(self._failed)

    def _failed(self, failure):
        self._loop.running = False  # a failed call ended the loop: nothing to stop
        self.log.failure("a repeating call failed; it is not repeated", failure)

    def stopService(self):
        """A Deferred firing once a call in progress (if any) is over."""
        if self._loop.running:
            self._loop.stop()
        self._finished.addCallback(lambda _: Service.stopService(self))
        return self._finished
