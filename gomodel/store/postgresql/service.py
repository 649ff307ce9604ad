"""The PostgreSQL store as one service: every aggregate, file contents included, in one database.

Several gateway hosts on one database share everything the store holds:
files and their bytes, batches (claimed by any host, see
L{gomodel.store.postgresql.batches}), stored responses and their replicas,
claims, usage, keys and budgets.
"""

from twisted.application.service import Service
from twisted.logger import Logger
from zope.interface import implementer

from gomodel.store.interfaces import IStoreService
from gomodel.store.postgresql.batches import PostgreSQLBatchStore
from gomodel.store.postgresql.blobs import PostgreSQLBlobStore
from gomodel.store.postgresql.claims import PostgreSQLClaims
from gomodel.store.postgresql.database import Database, JOB_TIMEOUT
from gomodel.store.postgresql.files import PostgreSQLFileStore
from gomodel.store.postgresql.keys import PostgreSQLBudgetStore, PostgreSQLKeyStore
from gomodel.store.postgresql.responses import PostgreSQLResponseStore
from gomodel.store.postgresql.usage import PostgreSQLUsageStore
from gomodel.store.postgresql.watches import PostgreSQLBackgroundWatches


@implementer(IStoreService)
class PostgreSQLStore(Service):
    """Opens the pool and migrates at start (retried while the server is down), closes at stop.

    @ivar files: the L{IFileStore}.
    @ivar blobs: the L{IBlobStore} (chunked rows).
    @ivar batches: the L{IBatchStore}.
    @ivar responses: the L{IResponseStore}.
    @ivar claims: the L{IClaims}.
    @ivar background: the L{IBackgroundWatches}.
    @ivar usage: the L{IUsageStore}.
    @ivar keys: the L{IKeyStore}.
    @ivar budgets: the L{IBudgetStore}.
    """

    log = Logger()

    def __init__(self, url, reactor, clock=None, *, max_conns=10, job_timeout=JOB_TIMEOUT):
        """
        @param url: the database (C{POSTGRES_URL}).
        @param reactor: the reactor the store's threads report back to.
        @param clock: an C{IReactorTime} for timestamps and leases (default: C{reactor}).
        @param max_conns: connections (and threads) at most (C{POSTGRES_MAX_CONNS}).
        @param job_timeout: the seconds a store job may take before its caller gets a 503 (L{Database}).
        """
        self._db = Database(url, reactor, clock, max_conns=max_conns, job_timeout=job_timeout)
        self.files = PostgreSQLFileStore(self._db)
        self.blobs = PostgreSQLBlobStore(self._db, reactor)
        self.batches = PostgreSQLBatchStore(self._db)
        self.responses = PostgreSQLResponseStore(self._db, reactor)
        self.claims = PostgreSQLClaims(self._db)
        self.background = PostgreSQLBackgroundWatches(self._db)
        self.usage = PostgreSQLUsageStore(self._db)
        self.keys = PostgreSQLKeyStore(self._db)
        self.budgets = PostgreSQLBudgetStore(self._db)

    @property
    def problem(self):
        """Why the database cannot be used now (a line for C{/health/ready}), or None."""
        return self._db.problem

    @property
    def opening(self) -> bool:
        """Whether the store's first attempt to open is still under way (L{gomodel.lifecycle.Readiness}: not
        ready yet; an attempt that failed is an outage every host shares, C{degraded})."""
        return self._db.opening

    @property
    def fatal(self):
        """Why this gateway can never use the database (migrated by a newer gateway), or None: unlike an
        outage, which every host shares, only this host is refused (see L{gomodel.lifecycle.Readiness})."""
        return self._db.fatal

    def startService(self):
        super().startService()
        self._db.start()

    def stopService(self):
        super().stopService()
        d = self.responses.written()  # the responses kept, before the pool closes
        d.addCallback(lambda _: self._db.stop())
        return d

    def started(self):
        if not self.running:
            raise RuntimeError("the store service was not started")
        return self._db.started()
