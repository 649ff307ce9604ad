"""The SQLite store as one service: the aggregates over one database, contents beside it.

Layout of C{GOMODEL_DATA_DIR}::

    gomodel.db     files, batches (requests, results, claims), responses, claims (WAL journal)
    files/         the contents of each file (L{gomodel.store.sqlite.blobs})
"""

import os

from twisted.application.service import Service
from twisted.logger import Logger
from zope.interface import implementer

from gomodel.store.interfaces import IStoreService
from gomodel.store.sqlite.batches import SQLiteBatchStore
from gomodel.store.sqlite.blobs import LocalBlobStore
from gomodel.store.sqlite.claims import SQLiteClaims
from gomodel.store.sqlite.database import Database
from gomodel.store.sqlite.files import SQLiteFileStore
from gomodel.store.sqlite.keys import SQLiteBudgetStore, SQLiteKeyStore
from gomodel.store.sqlite.responses import MISS_GRACE, SQLiteResponseStore
from gomodel.store.sqlite.usage import SQLiteUsageStore
from gomodel.store.sqlite.watches import SQLiteBackgroundWatches
from gomodel.store.sqlite.writer import RowWriter

DB_NAME = "gomodel.db"


class DataDirUnusable(SystemExit):
    """C{GOMODEL_DATA_DIR} cannot hold the store; twistd exits with status 1 (as for a port it cannot have,
    L{gomodel.listeners.ListenFailed}).

    @ivar path: the directory.
    @ivar reason: why, e.g. C{it is not a directory}.
    """

    def __init__(self, path, reason):
        super().__init__(1)
        self.path = path
        self.reason = reason

    def __str__(self):
        return f"cannot use GOMODEL_DATA_DIR {self.path}: {self.reason}"


@implementer(IStoreService)
class SQLiteStore(Service):
    """Opens and migrates the database at start, closes it at stop; the aggregates are attributes.

    @ivar files: the L{IFileStore}.
    @ivar blobs: the L{IBlobStore} (local disk).
    @ivar batches: the L{IBatchStore}.
    @ivar responses: the L{IResponseStore}.
    @ivar claims: the L{IClaims}.
    @ivar background: the L{IBackgroundWatches}.
    @ivar usage: the L{IUsageStore}.
    @ivar keys: the L{IKeyStore}.
    @ivar budgets: the L{IBudgetStore}.
    """

    log = Logger()

    def __init__(self, data_dir, reactor, clock=None, *, blob_threads=4, shared=True):
        """
        @param data_dir: where the database and the contents live.
        @param reactor: the reactor the store's threads report back to.
        @param clock: an C{IReactorTime} for timestamps and leases (default: C{reactor}).
        @param blob_threads: how many disk operations on contents may run at once.
        @param shared: whether other processes use the file too (C{--workers}): a stored response one of them
            kept a moment ago may not be written yet (L{SQLiteResponseStore}'s C{miss_grace}).
        """
        self.data_dir = os.path.abspath(data_dir)
        self._db = Database(os.path.join(self.data_dir, DB_NAME), reactor, clock)
        self.blobs = LocalBlobStore(os.path.join(self.data_dir, "files"), reactor, threads=blob_threads)
        self.files = SQLiteFileStore(self._db)
        self.batches = SQLiteBatchStore(self._db)
        self._writer = RowWriter(reactor, self._db.path, opened=self._db.when_open)
        self.responses = SQLiteResponseStore(self._db, clock if clock is not None else reactor, self._writer,
                                             waits=reactor, miss_grace=MISS_GRACE if shared else ())
        self.claims = SQLiteClaims(self._db)
        self.background = SQLiteBackgroundWatches(self._db)
        self.usage = SQLiteUsageStore(self._db, self._writer)
        self.keys = SQLiteKeyStore(self._db)
        self.budgets = SQLiteBudgetStore(self._db)
        self._started = None

    @property
    def problem(self):
        """Why the database could not be opened (a line for C{/health/ready}), or None."""
        return self._db.problem

    @property
    def opening(self) -> bool:
        """Whether the database is still being opened (and migrated): not ready yet."""
        return self._started is not None and not self._started.called

    @property
    def db_path(self):
        return self._db.path

    def privilegedStartService(self):
        """Check the data directory before twistd binds the ports: made where it is missing, unless this
        process runs as root (twistd may then switch to another user, C{--uid}, who makes it at
        L{startService}), and a directory where it exists.

        @raise DataDirUnusable: it is a file or a device, or cannot be made or written in (logged).
        """
        super().privilegedStartService()
        if hasattr(os, "geteuid") and os.geteuid() == 0:
            if os.path.exists(self.data_dir) and not os.path.isdir(self.data_dir):
                self._unusable("it is not a directory")
        else:
            self._make_data_dir()

    def startService(self):
        """Make the data directory where it is missing (as the user twistd runs as), then open the database
        in the store thread (L{started} fires once it is) and start the writer process.

        @raise DataDirUnusable: the directory cannot be made or written in (logged); nothing was started.
        """
        self._make_data_dir()
        super().startService()
        self._db.start()
        self.blobs.start()
        self._started = self._db.run(self._db.open)
        self._started.addCallback(lambda _: self._writer.start())  # before the load, not in it

        def failed(failure):
            self.log.failure("cannot open the store in {data_dir}: files and batches are unavailable",
                             failure, data_dir=self.data_dir)

        self._started.addErrback(failed)

    def _make_data_dir(self):
        path = self.data_dir
        if os.path.exists(path) and not os.path.isdir(path):
            self._unusable("it is not a directory")
        try:
            os.makedirs(path, exist_ok=True)
        except OSError as e:
            self._unusable(f"cannot create it: {e.strerror or e}")
        if not os.access(path, os.W_OK | os.X_OK, effective_ids=os.access in os.supports_effective_ids):
            self._unusable("the gateway's user cannot write in it")

    def _unusable(self, reason):
        error = DataDirUnusable(self.data_dir, reason)
        self.log.critical("{error}", error=str(error))
        raise error

    def stopService(self):
        super().stopService()
        self.responses.flush()  # handed to the writer before it stops
        d = self._writer.stop()  # what it was given is written first
        d.addCallback(lambda _: self._db.run(self._db.close))
        d.addErrback(lambda f: self.log.failure("closing the store", f))

        def stopped(_):
            self._db.stop()  # the thread is idle now: joining it is immediate
            self.blobs.stop()

        d.addBoth(stopped)
        return d

    def started(self):
        if self._started is None:
            raise RuntimeError("the store service was not started")
        d = self._db.run(self._db.conn)  # queued behind the opening job
        d.addCallback(lambda _: None)
        return d
