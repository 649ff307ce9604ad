"""The store and the services that use it, stopped one after the other."""

from twisted.application.service import MultiService, Service
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.logger import Logger


class BatchServices(MultiService):
    """The store (started first) and its users (the batch runner, sweeps, retention).

    Twisted's MultiService stops its children all at once; here the users are
    stopped first, last one first, and waited for (the runner cancels what
    is in flight, records the answers already read and releases its
    claims), then the store is closed.
    """

    log = Logger()

    def __init__(self, store, *users):
        """
        @param store: the store service (e.g. L{gomodel.store.SQLiteStore}).
        @param users: services over it, started after it in this order.
        """
        super().__init__()
        self.store = store
        store.setServiceParent(self)
        for user in users:
            user.setServiceParent(self)

    def stopService(self):
        Service.stopService(self)
        return Deferred.fromCoroutine(self._stop_in_order())

    async def _stop_in_order(self):
        for child in reversed(list(self)):
            try:
                await maybeDeferred(child.stopService)
            except Exception:
                self.log.failure("stopping {service}", service=child)
