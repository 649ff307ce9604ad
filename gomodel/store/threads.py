"""A thread pool owned by one store part, started and stopped with it."""

from twisted.internet.threads import deferToThreadPool
from twisted.python.threadpool import ThreadPool


class OwnedThreads:
    """Threads for blocking work (a database, a disk) that never keep a stopping process alive.

    L{start} also registers a reactor shutdown trigger, so the threads are
    joined even if their owner is never stopped; L{stop} removes it.
    """

    def __init__(self, reactor, name, maxthreads, minthreads=0):
        self._reactor = reactor
        self.pool = ThreadPool(minthreads=minthreads, maxthreads=maxthreads, name=name)
        self._trigger = None

    @property
    def running(self) -> bool:
        return self.pool.started and not self.pool.joined

    def start(self):
        self.pool.start()
        self._trigger = self._reactor.addSystemEventTrigger("during", "shutdown", self.stop, True)

    def stop(self, shutting_down=False):
        """Join the threads (at once when they are idle)."""
        trigger, self._trigger = self._trigger, None
        if trigger is not None:
            if not shutting_down:
                self._reactor.removeSystemEventTrigger(trigger)
            self.pool.stop()

    def run(self, f, *args):
        """A Deferred firing with C{f(*args)} run in one of the threads (failing with what it raised)."""
        return deferToThreadPool(self._reactor, self.pool, f, *args)
