"""The SQLite connection and the one thread that uses it.

All database work of the process runs in one dedicated thread (a
L{ThreadPool} of one), so the reactor never waits on the disk, but for the
inserts of the usage ledger and of the responses kept, which its writer
process makes (L{gomodel.store.sqlite.writer}); several connections on one file are
serialised by SQLite's lock (C{BEGIN IMMEDIATE}, C{busy_timeout}). The aggregate modules
(L{gomodel.store.sqlite.files} and its siblings) hand their statements to
L{Database.run}.
"""

import os
import sqlite3
from contextlib import contextmanager

from twisted.internet.defer import fail, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure

from gomodel.errors import StorageUnavailable
from gomodel.store.sqlite import rows  # (its adapters, for this process's connections; its settings)
from gomodel.store.sqlite.migrations import migrate
from gomodel.store.threads import OwnedThreads


class Database:
    """One SQLite file, its connection and its thread."""

    log = Logger()

    def __init__(self, path, reactor, clock=None):
        """
        @param path: the database file.
        @param reactor: runs the thread's results back on the reactor thread.
        @param clock: an C{IReactorTime} for timestamps and leases (default: C{reactor}).
        """
        self.path = path
        self._reactor = reactor
        self._clock = clock if clock is not None else reactor
        self._threads = OwnedThreads(reactor, "gomodel-store", 1, minthreads=1)
        self._pool = self._threads.pool
        self._conn = None
        self._broken = None

    def start(self):
        """Start the thread (the caller then runs L{open} in it)."""
        self._threads.start()

    def stop(self, shutting_down=False):
        """Join the thread (immediate once it is idle)."""
        self._threads.stop(shutting_down)

    @property
    def stopped(self) -> bool:
        """Whether the thread was stopped (L{run} fails and L{call} refuses from then on)."""
        return self._pool.joined

    @property
    def problem(self):
        """Why the database could not be opened, or None."""
        return self._broken

    def now(self) -> float:
        """The injected clock's time, read on the reactor thread."""
        return self._clock.seconds()

    def run(self, f, *args):
        """Run C{f(*args)} in the store thread.

        @return: a Deferred firing with its result; it fails with
            L{StorageUnavailable} once the store is stopped.
        """
        if self._pool.joined:  # stopped: a late caller gets an answer, not an exception
            return fail(StorageUnavailable.because("the gateway is stopping"))
        return self._threads.run(f, *args)

    def call(self, f, *args, what="a background write"):
        """Run C{f(*args)} in the store thread without a Deferred; a failure is logged.

        @return: False when the store is stopped (nothing was queued), else True.
        """
        if self._pool.joined:
            return False
        self._pool.callInThread(self.logged, f, args, what)  # (a method: no closure made per call)
        return True

    def logged(self, f, args, what):
        """In the store thread: C{f(*args)}, a failure logged (on the reactor thread) as C{what} failed."""
        try:
            f(*args)
        except Exception:
            self._reactor.callFromThread(self.log.failure, "{what} failed", Failure(), what=what)

    # -- in the store thread ------------------------------------------------------

    def open(self):
        conn = None
        try:
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            conn.row_factory = sqlite3.Row
            conn.execute("PRAGMA journal_mode=WAL")
            rows.tune(conn)
            migrate(conn)
        except Exception as e:
            self._broken = str(e) or type(e).__name__  # what every later call answers with
            if conn is not None:
                conn.close()
            raise
        self._conn = conn

    def close(self):
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()

    def when_open(self):
        """A Deferred firing with None once the database is open and its tables made (at once when they
        are); it fails with L{StorageUnavailable} when it cannot be opened, or the store is stopped."""
        if self._conn is not None:  # (set in the store thread: read here, it may lag by a moment)
            return succeed(None)
        return self.run(self.conn).addCallback(lambda _: None)  # queued behind the opening job

    def conn(self):
        """The open connection; raises L{StorageUnavailable} when the store is not open."""
        if self._conn is None:
            reason = self._broken or "the store is not open"
            raise StorageUnavailable.because(reason)
        return self._conn

    @contextmanager
    def transaction(self):
        """A write transaction (C{BEGIN IMMEDIATE}: the write lock is taken first, so reads in it are current)."""
        conn = self.conn()
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield conn
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")
