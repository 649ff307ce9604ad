"""Rows written by a child process: the SQLite inserts that would otherwise hold the gateway's interpreter lock.

Python's sqlite3 binds a statement's values holding the interpreter lock, and
a usage flush of 1,000 rows is about 5 ms of CPU at once: in the store's
thread it took the lock from the reactor's thread about 150 us a statement,
and it was half of chat's p99 at c=10 on two workers
(bench/results/2026-12-04-session42.md); the responses kept cost the same
thread 10 us a streamed Responses request. Here the reactor's thread only
encodes the rows (C{marshal}: twice orjson's time, about 0.2 us a row) and
writes them to a pipe; L{gomodel.store.sqlite.rows}, run as a script (the
standard library only: about 14 MiB; it decodes marshal in half the time it
took to decode orjson's JSON, and orjson took it 4 MiB more), binds and commits
them, pausing between statements.
"""

import marshal
import os
import struct
import sys
from collections import deque

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.error import ProcessExitedAlready
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger

from gomodel.errors import RowsRejected, StorageUnavailable
from gomodel.store.sqlite import rows as script

# How long a stop waits for the child to write what it was given before it is killed.
STOP_TIMEOUT = 30.0


class RowWriter:
    """Writes batches of rows into one SQLite database through one child process, in the order given.

    The child starts at L{start}, or at the first batch, and again after it
    exited; a stop lets it finish what it was given.
    """

    log = Logger()

    def __init__(self, reactor, path, *, opened=None, python=sys.executable, stop_timeout=STOP_TIMEOUT):
        """
        @param reactor: an C{IReactorProcess} and C{IReactorTime}.
        @param path: the database file, its tables made already (or once C{opened} fires).
        @param opened: None, or a callable returning a Deferred that fires once the database is open and its
            tables made (L{gomodel.store.sqlite.database.Database.when_open}): each write waits for it.
        @param python: the interpreter the child runs on: this one's version (batches go as marshal).
        """
        self._reactor = reactor
        # isolated (no PYTHON* variables, no gomodel on its path) and without site (no site-packages, .pth files)
        self._argv = [python, "-I", "-S", script.__file__, path]
        self._stop_timeout = stop_timeout
        self._opened = opened
        self._child = None
        self._stopped = False

    def start(self):
        """Start the child now (unless it runs, or L{stop} was called), rather than at the first batch: its
        start (about 30 ms of CPU) then lands before the load, not in it. A child that cannot start is logged;
        the first batch tries again."""
        if self._child is None and not self._stopped:
            try:
                self._spawn()
            except OSError:
                self.log.failure("cannot start the store's writer process")

    @property
    def stopped(self) -> bool:
        """Whether L{stop} was called (every write fails from then on)."""
        return self._stopped

    def write(self, insert, rows, conflict=""):
        """Write C{rows} (tuples of one length) with C{insert} and C{conflict}, as
        L{gomodel.store.sqlite.rows.insert_rows} takes them, in one transaction.

        @return: a Deferred firing with the number of rows once they are
            committed; it fails with L{RowsRejected} when one of them holds a
            value the table cannot (an integer beyond 64 bits, a lone
            surrogate, a constraint: none was written), with
            L{StorageUnavailable} when the database cannot be written now or
            the child exited (the next batch starts another), or cannot be opened.
        """
        if self._opened is not None:
            return self._opened().addCallback(lambda _: self._write(insert, rows, conflict))
        return self._write(insert, rows, conflict)

    def _write(self, insert, rows, conflict):
        if self._stopped:
            return fail(StorageUnavailable.because("the gateway is stopping"))
        try:
            data = marshal.dumps((insert, conflict, rows))
        except ValueError as e:  # a type marshal does not take (the child refuses the values SQLite cannot hold)
            return fail(RowsRejected(str(e)))
        if self._child is None:
            try:
                self._spawn()
            except OSError as e:
                return fail(StorageUnavailable.because(f"its writer: {e}"))
        return self._child.send(data)

    def _spawn(self):
        child = _Child(self)
        self._reactor.spawnProcess(child, self._argv[0], self._argv, env=os.environ, childFDs={0: "w", 1: "r", 2: "r"})
        self._child = child

    def stop(self):
        """Close the child's input: it writes the batches it was given, then exits.

        @return: a Deferred firing once it has exited (at once when none
            runs); one that takes longer than the stop timeout is killed.
        """
        self._stopped = True
        child = self._child
        if child is None:
            return succeed(None)
        child.transport.closeStdin()
        killer = self._reactor.callLater(self._stop_timeout, child.kill)
        stopped = Deferred()

        def ended(_):
            if killer.active():
                killer.cancel()
            stopped.callback(None)

        child.ended.addCallback(ended)
        return stopped

    def _ended(self, child, status):
        if self._child is child:
            self._child = None
        if status and not self._stopped:
            self.log.error("the store's writer process exited ({status}); another starts with the next write",
                           status=status)


class _Child(ProcessProtocol):
    """One writer process: batches sent, answers read back in order."""

    def __init__(self, writer):
        self._writer = writer
        self._waiting = deque()
        self._out = b""
        self._err = b""
        self.ended = Deferred()

    def send(self, data):
        d = Deferred()
        self._waiting.append(d)
        self.transport.writeSequence([struct.pack(">I", len(data)), data])
        return d

    def outReceived(self, data):
        *lines, self._out = (self._out + data).split(b"\n")
        for line in lines:
            word, _, rest = line.partition(b" ")
            d = self._waiting.popleft()
            if word == b"ok":
                d.callback(int(rest))
            elif word == b"rejected":
                d.errback(RowsRejected(rest.decode("utf-8", "replace")))
            else:
                d.errback(StorageUnavailable.because(rest.decode("utf-8", "replace")))

    def errReceived(self, data):
        *lines, self._err = (self._err + data).split(b"\n")
        for line in lines:
            self._writer.log.error("the store's writer process: {line}", line=line.decode("utf-8", "replace"))

    def kill(self):
        try:
            self.transport.signalProcess("KILL")
        except ProcessExitedAlready:
            pass

    def processEnded(self, reason):
        if self._err:
            self.errReceived(b"\n")
        status = reason.value.exitCode if reason.value.exitCode is not None else f"signal {reason.value.signal}"
        self._writer._ended(self, status)
        waiting, self._waiting = self._waiting, deque()
        for d in waiting:
            d.errback(StorageUnavailable.because(f"its writer exited: {status}"))
        self.ended.callback(None)
