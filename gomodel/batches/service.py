"""The store and the batch runner as one service, stopped one after the other."""

from twisted.application.service import MultiService, Service
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.logger import Logger

from gomodel.batches.runner import BatchRunner
from gomodel.store import SQLiteStore


class BatchServices(MultiService):
    """The store (started first) and the runner over it.

    Twisted's MultiService stops its children all at once; here the runner is
    stopped first and waited for (it cancels what is in flight and records the
    answers already read), then the store is closed.
    """

    log = Logger()

    def __init__(self, config, registry, reactor, exchange, *, primary=True):
        """
        @param primary: this process sweeps the data directory's leftovers and
            executes batches; other processes on the same data directory
            (C{--workers}) only store batches and cancellations for it.
        """
        super().__init__()
        self.store = SQLiteStore(config.store.data_dir, reactor, sweep=primary)
        self.store.setServiceParent(self)
        self.runner = BatchRunner(self.store, registry, reactor, exchange,
                                  concurrency=config.limits.batch_concurrency_per_provider,
                                  max_attempts=config.limits.batch_max_attempts, execute=primary)
        self.runner.setServiceParent(self)

    def stopService(self):
        Service.stopService(self)
        return Deferred.fromCoroutine(self._stop_in_order())

    async def _stop_in_order(self):
        for child in reversed(list(self)):
            try:
                await maybeDeferred(child.stopService)
            except Exception:
                self.log.failure("stopping {service}", service=child)
