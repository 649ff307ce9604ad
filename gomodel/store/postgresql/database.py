"""The PostgreSQL connection pool and the threads that use it.

Statements run with psycopg 3 in an owned thread pool sized to the
connection pool (C{POSTGRES_MAX_CONNS}), never on the reactor. Each job
borrows one connection (autocommit; writes open their own transaction)
and gives it back; each is checked before it is lent (L{_lent}), and one
that broke (a restarted server, a killed backend) is closed, replaced by
the pool, and the next tried at once. A failure to reach the server
(C{OperationalError}, C{InterfaceError}, a pool timeout) becomes
L{StorageUnavailable} (a 503) and marks the store down until a statement
succeeds again; a probe every half second notices the server's return
without traffic. A job the server rolled back for a conflict with
concurrent ones (a deadlock, a serialization failure) is run again, up to
L{CONFLICT_ATTEMPTS} times in all, and then is L{StorageConflict} (a 503
of its own): the store is not down.

At start the schema is migrated (L{gomodel.store.postgresql.migrations})
under a transaction-level advisory lock; while the server cannot be
reached the opening is retried with a backoff, so a gateway started before
its database comes up by itself.
"""

import logging
import random
import re
import time
from contextlib import contextmanager
from threading import Lock

from twisted.internet.defer import Deferred, fail
from twisted.internet.task import LoopingCall
from twisted.python.failure import Failure
from twisted.logger import Logger

from gomodel.errors import InvalidRequest, StorageConflict, StorageUnavailable
from gomodel.store.postgresql.errors import NotMigrated
from gomodel.store.postgresql.migrations import migrate
from gomodel.store.threads import OwnedThreads

POOL_TIMEOUT = 5.0  # how long a job waits for a connection before it is a 503
# How long a store job may take before its caller gets a 503: a server that hangs with its connections
# alive (stopped, its disk stalled, a lock never released) answers no probe and no keepalive. Its statement
# is then cancelled as psql's Ctrl-C does (libpq's cancel request, on a connection of its own), which frees
# its thread and connection where the server still runs. (No limit is set on the server: a startup
# `options` parameter is refused by PgBouncer, and a SET would outlive the session behind a transaction
# pooler; POSTGRES_URL's own `options=-c statement_timeout=...` may add one.)
JOB_TIMEOUT = 30.0
DELETE_BATCH = 10000  # the most rows one statement of a retention sweep deletes (L{in_batches})
CANCEL_TIMEOUT = 10.0  # seconds a cancel request may take (a stopped server answers none)
DOWN_TIMEOUT = 1.0  # the same while the database is known to be down
CONNECT_TIMEOUT = 5  # seconds, for each new connection
# While the store is down, the probe asks the pool for a connection this often (waiting DOWN_TIMEOUT for one;
# it does nothing while the store is up), and the pool gives up a connection it failed to make after trying
# again once, RECONNECT_TIMEOUT later: so it tries about every half second while anything waits, and the store
# answers within about that of the server accepting connections again. (Its own backoff doubles for ever, 1 s,
# 2 s, 4 s: with 8 s, the probe waited in vain for a connection next tried up to 4 s away.)
PROBE_INTERVAL = 0.5
RECONNECT_TIMEOUT = 0.5
# A server that vanished without a word (its host lost its network, powered off, a firewall dropping the
# connection) sends no reset: without these a statement on such a connection waits for the kernel's own
# limits (about 15 minutes for a write, for ever for a read), holding a store thread and its request. Probes
# after 5 s idle, every 2 s, 3 unanswered: dead; data sent and unacknowledged for 15 s: dead.
CONN_OPTIONS = {"connect_timeout": CONNECT_TIMEOUT, "keepalives": 1, "keepalives_idle": 5,
                "keepalives_interval": 2, "keepalives_count": 3, "tcp_user_timeout": 15000}
OPEN_BACKOFF = (0.5, 10.0)  # the first and the longest wait between attempts to open
# A job rolled back by the server to settle a conflict with concurrent transactions (SQLSTATE 40001, a
# serialization failure; 40P01, the victim of a deadlock) is run again, after a short random pause (up to
# CONFLICT_PAUSE times the attempts so far, in seconds), this many times in all: each job's transactions are
# whole (what a rolled-back one wrote is gone), so running it again is what the server asks.
CONFLICT_ATTEMPTS = 3
CONFLICT_PAUSE = 0.02
_CONFLICTS = ("40001", "40P01")
# Where libpq and psycopg name the server: 'connection to server at "h" (ip), port 5432 failed: ', 'on socket
# "/path" failed: ', "failed to resolve host 'h'"; a reason leaves them out (it reaches clients and /health/ready).
_SERVER = re.compile(r'connection to server (?:at "[^"]*"(?: \([^)]*\))?, port \d+|on socket "[^"]*") failed: ')
_HOST = re.compile(r"""\b(host(?: name)?) (?:'[^']*'|"[^"]*")""")


class Database:
    """One PostgreSQL database: its pool, its threads, the opening and the health probe."""

    log = Logger()

    def __init__(self, url, reactor, clock=None, *, max_conns=10, job_timeout=JOB_TIMEOUT):
        """
        @param url: a libpq connection string or C{postgresql://} URL (its password is never logged).
        @param reactor: runs the threads' results back on the reactor thread.
        @param clock: an C{IReactorTime} for timestamps and leases (default: C{reactor}).
        @param max_conns: the most connections (and threads) used at once.
        @param job_timeout: the seconds a job may take (L{JOB_TIMEOUT}).
        """
        self._url = url
        self._options = _options(url)
        self._job_timeout = job_timeout
        self._reactor = reactor
        self._clock = clock if clock is not None else reactor
        self.max_conns = max_conns
        self._threads = OwnedThreads(reactor, "gomodel-postgres", max_conns)
        # (their own: the store's threads are those the statements to cancel hold)
        self._cancels = OwnedThreads(reactor, "gomodel-postgres-cancel", 2)
        self._pool = None
        self._opened = False
        self._tried = False  # whether an attempt to open has ended (opened or failed)
        self._fatal = None  # a reason the store will never open (a newer schema)
        self._waiting = []  # (Deferred, f, args, deadline or None) asked for before the store opened
        self._retry = None
        self._delay = OPEN_BACKOFF[0]
        self._probe = None
        self.problem = "the store is not open yet"  # None while the database answers
        self._errors_at_connect = 0  # the pool's failed connection attempts when it last made one

    # -- lifetime -----------------------------------------------------------------

    def start(self):
        """Start the threads, open the pool and migrate (retried until the server answers)."""
        from psycopg_pool import ConnectionPool

        # The pool warns through the standard logging of every failed reconnection (twice a second while
        # the server is down), naming its host and port, which twistd writes to its log as errors; this
        # store says once, without them, that the database is unavailable and when it is back.
        logging.getLogger("psycopg.pool").setLevel(logging.ERROR)
        self._threads.start()
        self._cancels.start()
        self._pool = ConnectionPool(
            self._url, min_size=min(2, self.max_conns), max_size=self.max_conns, open=False,
            kwargs={"autocommit": True, **self._options}, timeout=POOL_TIMEOUT, name="gomodel",
            reconnect_timeout=RECONNECT_TIMEOUT, configure=self._connected)
        self._probe = LoopingCall(self._check)
        self._probe.clock = self._reactor
        self._probe.start(PROBE_INTERVAL, now=False)
        self._open()

    def stop(self):
        """Close the pool and join the threads.

        @return: a Deferred firing with None once closed.
        """
        if self._probe is not None and self._probe.running:
            self._probe.stop()
        if self._retry is not None and self._retry.active():
            self._retry.cancel()
        waiting, self._waiting = self._waiting, []
        for d, *_ in waiting:
            d.errback(StorageUnavailable.because("the gateway is stopping"))
        pool, self._pool = self._pool, None
        self._cancels.stop()
        if pool is None:
            self._threads.stop()
            return Deferred.fromCoroutine(_nothing())
        d = self._threads.run(pool.close, 5.0)
        d.addErrback(lambda f: self.log.failure("closing the PostgreSQL pool", f))
        d.addBoth(lambda _: self._threads.stop())
        return d

    def _open(self):
        self._retry = None
        d = self._threads.run(self._open_in_thread)

        def opened(_):
            self._tried = True
            self._opened, self.problem, self._delay = True, None, OPEN_BACKOFF[0]
            self.log.info("PostgreSQL store open ({conns} connections at most)", conns=self.max_conns)
            waiting, self._waiting = self._waiting, []
            now = self._reactor.seconds()
            for waiter, f, args, deadline in waiting:  # (each under what its time limit has left: past it, its
                left = self._job_timeout if deadline is None else max(deadline - now, 0.0)  # statement cancelled
                self._run(f, args, _Job(), left).addBoth(_answer, waiter)

        def failed(failure):
            if self._pool is None:
                return  # stopped meanwhile
            self._tried = True
            reason = _reason(failure.value)
            if failure.check(NotMigrated):
                self._fatal = self.problem = reason
                self.log.error("cannot use the PostgreSQL store: {reason}", reason=reason)
            else:
                # Said once a streak (and when the reason changes): the attempts go on every 10 s.
                said, self.problem = self.problem == reason, reason
                (self.log.debug if said else self.log.warn)(
                    "cannot open the PostgreSQL store ({reason}); trying again in {delay:g}s, then every "
                    "{longest:g}s at most (not logged again until it opens or the reason changes)",
                    reason=reason, delay=self._delay, longest=OPEN_BACKOFF[1])
                self._retry = self._reactor.callLater(self._delay, self._open)
                self._delay = min(self._delay * 2, OPEN_BACKOFF[1])
            waiting, self._waiting = self._waiting, []
            for waiter, *_ in waiting:
                waiter.errback(self._unavailable())

        d.addCallbacks(opened, failed)
        return d

    def _open_in_thread(self):
        import psycopg

        pool = self._pool
        if pool is None:
            raise StorageUnavailable.because("the gateway is stopping")
        # Its own connection: a refused one fails now, not after the pool's timeout.
        with psycopg.connect(self._url, autocommit=True, **self._options) as conn:
            migrate(conn)
        pool.open(wait=False)

    def _connected(self, conn):
        """The pool made a connection (in its own thread): the server accepts them."""
        pool = self._pool
        if pool is not None:  # (not stopped meanwhile)
            self._errors_at_connect = pool.get_stats().get("connections_errors", 0)

    def _refusing(self, pool) -> bool:
        """Whether, the store being down, the pool has no connection to lend and its last attempt to make
        one failed (the server refuses or cannot be reached): a job need not wait for one.

        Connections being replaced (a restarted server, killed backends) are made at the first attempt:
        jobs then wait for them as usual.
        """
        stats = pool.get_stats()
        return stats["pool_available"] == 0 and stats.get("connections_errors", 0) > self._errors_at_connect

    def _check(self):
        if not self._opened or self._pool is None or self.problem is None:
            return None
        # (it waits for a connection even while the server refuses them: its request makes the pool try again)
        return self._run(_ping, (), _Job(patient=True)).addErrback(lambda f: None)

    @property
    def fatal(self):
        """Why this gateway can never use the database (a newer schema: L{NotMigrated}), or None."""
        return self._fatal

    @property
    def opening(self) -> bool:
        """Whether the first attempt to open (and migrate) is still under way."""
        return self._pool is not None and not self._tried

    @property
    def opened(self) -> bool:
        """Whether the schema was migrated (statements may run)."""
        return self._opened

    def started(self) -> Deferred:
        """@return: a Deferred firing with None once the store opened, failing with why it cannot."""
        return self._submit(_ping, (), None).addCallback(lambda _: None)

    # -- jobs ---------------------------------------------------------------------

    def now(self) -> float:
        """The injected clock's time, read on the reactor thread."""
        return self._clock.seconds()

    def run(self, f, *args):
        """Run C{f(conn, *args)} in a store thread with a pooled connection.

        @return: a Deferred firing with its result; it fails with
            L{StorageUnavailable} when the server cannot be reached, does not
            answer within the job's time limit (L{JOB_TIMEOUT}), or the store
            is stopped; with L{InvalidRequest} when a value cannot be held
            (psycopg's C{DataError}: a text with a NUL character, a number
            past its column); else with what C{f} raised. A job asked for
            before the store opened waits for it, within the same time limit
            (the opening's migration may wait for another host's lock).
        """
        return self._submit(f, args, self._job_timeout)

    def _submit(self, f, args, open_within):
        if self._pool is None or self._fatal is not None:
            return fail(self._unavailable())
        if not self._opened:
            if self._retry is not None:  # the last attempt to open failed: answer at once
                return fail(self._unavailable())
            d = Deferred(self._unqueue)
            self._waiting.append((d, f, args, None if open_within is None else self._reactor.seconds() + open_within))
            if open_within is not None:
                d.addTimeout(open_within, self._reactor, onTimeoutCancel=self._not_open)
            return d
        return self._run(f, args, _Job())

    def _unqueue(self, waiter):
        """A job waiting for the store to open gave up (past its time limit): it is not run when it opens."""
        self._waiting = [waiting for waiting in self._waiting if waiting[0] is not waiter]

    def _run(self, f, args, job, timeout=None):
        """C{f(conn, *args)} as C{job}, in a store thread, within C{timeout} seconds (None: the job time limit)."""
        d = self._threads.run(self._job, f, args, job)
        return d.addTimeout(self._job_timeout if timeout is None else timeout, self._reactor,
                            onTimeoutCancel=job.timed_out(self))

    def _not_open(self, result, timeout):
        """The C{onTimeoutCancel} of a job that waited for the store to open past its time limit (one that
        opened meanwhile is cancelled at the same time by its own: L{_timed_out})."""
        if self._opened:
            raise StorageUnavailable.because(f"the database did not answer within {timeout:g}s")
        raise StorageUnavailable.because(f"the store did not open within {timeout:g}s: its schema migration may be "
                                         "waiting for another gateway's")

    def _timed_out(self, job, timeout):
        """C{job} went past its time limit: its statement is cancelled (L{JOB_TIMEOUT}); the store is marked
        down until a statement succeeds again, and probed meanwhile.

        @raise StorageUnavailable: always, for the job's caller (a 503).
        """
        reason = f"the database did not answer within {timeout:g}s"
        if self.problem is None:
            self.log.warn("PostgreSQL store unavailable: {reason}", reason=reason)
            self.problem = reason
        job.cancelled = True  # (one still waiting for a thread or a connection is then never run)
        if job.conn is not None and self._cancels.running:
            self._cancels.run(job.cancel).addErrback(
                lambda f: self.log.debug("cancelling a PostgreSQL statement failed: {reason}",
                                         reason=_reason(f.value)))
        raise StorageUnavailable.because(reason)

    def call(self, f, *args, what="a background write"):
        """Run C{f(conn, *args)} without waiting for it; a failure is logged.

        @return: False when the store is stopped (nothing was queued), else True.
        """
        if self._pool is None:
            return False
        d = self.run(f, *args)
        d.addErrback(lambda failure: self.log.failure("{what} failed", failure, what=what)
                     if not failure.check(StorageUnavailable) else
                     self.log.warn("{what} failed: {error}", what=what, error=failure.value.message))
        return True

    def _unavailable(self):
        reason = self._fatal or self.problem or "the gateway is stopping"
        return StorageUnavailable.because(reason)

    def _job(self, f, args, job):
        import psycopg

        pool = self._pool
        if pool is None:
            raise StorageUnavailable.because("the gateway is stopping")
        try:
            if self.problem is not None and not job.patient and self._refusing(pool):
                raise StorageUnavailable.because(self.problem)
            # Known down: fail fast instead of queueing every request for the pool's whole timeout.
            with _lent(pool, POOL_TIMEOUT if self.problem is None else DOWN_TIMEOUT) as conn:
                with job.lock:
                    if job.cancelled:  # past its time limit while it waited: its caller had its 503
                        raise StorageUnavailable.because("cancelled past the time limit")
                    job.conn = conn
                try:
                    result = _attempts(f, conn, args, job)
                except psycopg.errors.ReadOnlySqlTransaction:
                    # A server read-only now (a failover's old primary, a standby): the pool makes a new
                    # connection in place of this one, and at the first of a streak of the others too
                    # (psycopg-pool 3.3's drain; once, not at each write refused), which find the writable
                    # server once there is one again.
                    conn.close()
                    drain = getattr(pool, "drain", None)
                    if drain is not None and self.problem is None:
                        drain()
                    raise
                finally:
                    with job.lock:  # (a cancel under way ends first: the connection may go to another job)
                        job.conn = None
        except (psycopg.OperationalError, psycopg.InterfaceError, psycopg.errors.ReadOnlySqlTransaction) as e:
            if job.cancelled:  # (its caller had its 503; the store stays down until a statement succeeds)
                raise StorageUnavailable.because("cancelled past the time limit") from e
            reason = _reason(e)
            if self.problem is None:
                self._reactor.callFromThread(self.log.warn, "PostgreSQL store unavailable: {reason}", reason=reason)
            self.problem = reason
            raise StorageUnavailable.because(reason) from e
        except psycopg.DataError as e:
            # A value PostgreSQL cannot hold, from a request: a text with a NUL character (an id in a path, a
            # filter, a key's name: SQLite keeps those), a number past its column. The request's error.
            raise InvalidRequest("A value of the request cannot be kept or looked up by the gateway's store "
                                 "(a text holding a NUL character, or a number out of range).",
                                 code="invalid_value") from e
        if self.problem is not None and self._opened:
            self.problem = None
            self._reactor.callFromThread(self.log.info, "PostgreSQL store available again")
        return result


@contextmanager
def _lent(pool, timeout):
    """A working connection of C{pool}, had within C{timeout} seconds, given back after (its transaction, if
    any, committed or rolled back as psycopg's C{with conn} does).

    Each is checked before it is lent (an empty statement); one that fails (its backend killed, the server
    restarted) is closed, which makes the pool make another in its place, and the next is tried at once.
    (psycopg_pool's own C{check} slept between dead ones with its reconnection backoff, 1 s, 2 s, 4 s: four
    killed while idle took the whole wait, a 503 from a healthy server, and the first one took the 1 s wait
    of a store marked down.)

    @raise PoolTimeout: no working connection could be had in time.
    """
    from psycopg_pool import ConnectionPool

    deadline = time.monotonic() + timeout
    while True:
        conn = pool.getconn(timeout=deadline - time.monotonic())
        try:
            ConnectionPool.check_connection(conn)
            break
        except Exception:
            conn.close()
            pool.putconn(conn)
    try:
        with conn:
            yield conn
    finally:
        pool.putconn(conn)


def _attempts(f, conn, args, job):
    """C{f(conn, *args)}, run again while the server rolls it back for a conflict (L{CONFLICT_ATTEMPTS}).

    @raise StorageConflict: it was rolled back so each time.
    """
    import psycopg

    for attempt in range(1, CONFLICT_ATTEMPTS + 1):
        try:
            return f(conn, *args)
        except psycopg.OperationalError as e:
            if e.sqlstate not in _CONFLICTS or job.cancelled:
                raise
            if attempt == CONFLICT_ATTEMPTS:
                raise StorageConflict.after(attempt, type(e).__name__) from e
            time.sleep(random.uniform(0, CONFLICT_PAUSE * attempt))
            if job.cancelled:  # past its time limit meanwhile: its caller had its 503, nothing more is written
                raise


class _Job:
    """One job's connection while its statement runs (its thread sets it), for a cancel past its time limit."""

    __slots__ = ("conn", "cancelled", "lock", "patient")

    def __init__(self, patient=False):
        self.conn = None
        self.cancelled = False
        self.lock = Lock()
        self.patient = patient  # it waits for a connection even while the server refuses them

    def cancel(self):
        """Cancel the job's statement if it still runs (in a thread: libpq's cancel request blocks)."""
        with self.lock:
            if self.conn is not None:
                self.conn.cancel_safe(timeout=CANCEL_TIMEOUT)

    def timed_out(self, database):
        """The C{onTimeoutCancel} of the job's Deferred (L{Database._timed_out})."""
        return lambda result, timeout: database._timed_out(self, timeout)


def _options(url) -> dict:
    """L{CONN_OPTIONS} less those the URL sets itself (its own win)."""
    from psycopg.conninfo import conninfo_to_dict

    try:
        own = conninfo_to_dict(url)
    except Exception:  # a malformed URL: connecting says why
        own = {}
    return {name: value for name, value in CONN_OPTIONS.items() if name not in own}


async def in_batches(run, f, *args):
    """Delete in batches: C{await run(f, *args, DELETE_BATCH)} (C{f} deletes at most that many rows and returns
    how many it did) again until fewer go, each a job of its own with its own time limit: a large backlog (a busy
    fleet's day of usage records) in one statement ran past the job's limit, was cancelled, and was never deleted.

    @return: how many rows were deleted in all.
    """
    deleted = 0
    while True:
        count = await run(f, *args, DELETE_BATCH)
        deleted += count
        if count < DELETE_BATCH:
            return deleted


def _answer(result, waiter):
    """Give a job's C{result} to the C{waiter} it waited for the store's opening with, unless that gave up meanwhile
    (past its time limit: its caller had its 503), when the result goes nowhere (chained, it raised
    C{AlreadyCalledError} into the reactor's log)."""
    if not waiter.called:
        if isinstance(result, Failure):
            waiter.errback(result)
        else:
            waiter.callback(result)


def _ping(conn):
    conn.execute("SELECT 1")


async def _nothing():
    return None


def _reason(error) -> str:
    """A one-line reason without the server's address or credentials."""
    if isinstance(error, StorageUnavailable):
        return error.message
    name = type(error).__name__
    text = str(error).strip().splitlines()
    if isinstance(error, NotMigrated):
        return text[0] if text else name
    if name in ("PoolTimeout",):
        return "no database connection could be had in time"
    if not text:
        return name
    # libpq's and the server's messages name the host (and the user), never a password: the host goes
    return f"{name}: " + _HOST.sub(r"\1", _SERVER.sub("", text[0]))
