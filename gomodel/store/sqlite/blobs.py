"""L{IBlobStore} on the local disk: file contents under the data directory.

Layout::

    files/<blob_id>        committed contents (a file's id is its blob's id)
    files/.spool/<n>.part  writes not committed yet (an upload being received)

Every open, write, read, rename and unlink runs in the blob store's own
thread pool, never on the reactor; a writer's chunks go to disk in order,
one at a time. Uncommitted writes and orphaned blobs are swept by age (their
modification time), so a sweep in one process never removes an upload
another process is still writing to.
"""

import os
import uuid
from collections import deque

from twisted.internet.defer import Deferred, fail, succeed
from twisted.logger import Logger
from zope.interface import implementer

from gomodel.errors import StorageUnavailable
from gomodel.logs import log_failure
from gomodel.store.interfaces import IBlobStore, IBlobWriter
from gomodel.store.threads import OwnedThreads

SKIP_CHUNK = 1024 * 1024


@implementer(IBlobStore)
class LocalBlobStore:
    """Blobs as files in one directory; call L{start} and L{stop} (the store service does)."""

    log = Logger()

    def __init__(self, root, reactor, threads=4):
        """
        @param root: the directory of the contents (created when needed).
        @param threads: how many disk operations may run at once.
        """
        self.root = os.path.abspath(root)
        self.spool_dir = os.path.join(self.root, ".spool")
        self._threads = OwnedThreads(reactor, "gomodel-blobs", threads)

    def start(self):
        self._threads.start()

    def stop(self, shutting_down=False):
        self._threads.stop(shutting_down)

    def run(self, f, *args):
        """Run C{f(*args)} in the blob threads; an C{OSError} becomes L{StorageUnavailable}."""
        if not self._threads.running:
            return fail(StorageUnavailable.because("the gateway is stopping"))
        return self._threads.run(_disk, f, *args)

    def path(self, blob_id):
        if not blob_id or "/" in blob_id or os.sep in blob_id or blob_id.startswith("."):
            raise ValueError("bad blob id")
        return os.path.join(self.root, blob_id)

    # -- IBlobStore -----------------------------------------------------------------

    def create(self):
        return _LocalWriter(self)

    def size(self, blob_id):
        return self.run(self._size, self.path(blob_id))

    @staticmethod
    def _size(path):
        try:
            return os.path.getsize(path)
        except FileNotFoundError:
            return None

    def read(self, blob_id, offset, length):
        return self.run(self._read, self.path(blob_id), offset, length)

    @staticmethod
    def _read(path, offset, length):
        try:
            handle = open(path, "rb")
        except FileNotFoundError:
            return None
        with handle:
            handle.seek(offset)
            return handle.read(length)

    def read_lines(self, blob_id, offset, max_lines, max_line_bytes, max_bytes=None):
        return self.run(self._read_lines, self.path(blob_id), offset, max_lines, max_line_bytes, max_bytes)

    @staticmethod
    def _read_lines(path, offset, max_lines, max_line_bytes, max_bytes):
        try:
            handle = open(path, "rb")
        except FileNotFoundError:
            return None
        lines, taken = [], 0
        with handle:
            handle.seek(offset)
            while len(lines) < max_lines:
                at = handle.tell()
                line = handle.readline(max_line_bytes + 2)
                if not line:
                    return lines, None
                if not line.endswith(b"\n") and len(line) > max_line_bytes:
                    while line and not line.endswith(b"\n"):  # skip the rest of an over-long line
                        line = handle.readline(SKIP_CHUNK)
                    lines.append(None)
                    continue
                line = line.rstrip(b"\r\n")
                taken += len(line)
                if max_bytes is not None and lines and taken > max_bytes:
                    return lines, at  # (the next slice starts with it)
                lines.append(line)
            return lines, handle.tell()

    def delete(self, blob_id):
        return self.run(_unlink, self.path(blob_id))

    def stale(self, older_than):
        return self.run(self._stale, older_than)

    def _stale(self, older_than):
        found = []
        try:
            entries = list(os.scandir(self.root))
        except FileNotFoundError:
            return found
        for entry in entries:
            if not entry.name.startswith(".") and entry.is_file() and _mtime(entry.path) < older_than:
                found.append(entry.name)
        return found

    def discard_writes(self, older_than):
        return self.run(self._discard_writes, older_than)

    def _discard_writes(self, older_than):
        removed = 0
        # Bottom-up, so that an earlier layout's per-run directories go once empty.
        for parent, dirs, names in os.walk(self.spool_dir, topdown=False):
            for name in names:
                path = os.path.join(parent, name)
                if _mtime(path) < older_than and _unlink(path):
                    removed += 1
            for name in dirs:
                try:
                    os.rmdir(os.path.join(parent, name))
                except OSError:
                    pass  # not empty: something in it is still being written
        return removed


@implementer(IBlobWriter)
class _LocalWriter:
    """A spool file written in order by the blob threads, renamed into place by L{commit}."""

    def __init__(self, store):
        self._store = store
        self._path = os.path.join(store.spool_dir, f"{uuid.uuid4().hex}.part")
        self._handle = None
        self._queue = deque()  # (f, args, Deferred) not started yet
        self._busy = False
        self._broken = None
        self._over = False  # committed or aborted

    def write(self, data):
        if self._over:
            return fail(StorageUnavailable("The blob was already committed or discarded."))
        return self._queued(self._write, data)

    def commit(self, blob_id):
        target = self._store.path(blob_id)
        if self._over:
            return fail(StorageUnavailable("The blob was already committed or discarded."))
        self._over = True
        return self._queued(self._commit, target)

    def abort(self):
        if self._over and not self._queue and not self._busy:
            return succeed(None)
        self._over = True  # an abort runs even after a failed write
        d = self._queued(self._abort)
        # The store down (its writes failed for that too): a warning; the sweep of leftovers takes the rest later
        d.addErrback(lambda f: log_failure(self._store.log, f, "discarding a blob write failed"))
        return d

    def _queued(self, f, *args):
        d = Deferred()
        self._queue.append((f, args, d))
        self._next()
        return d

    def _next(self):
        if self._busy or not self._queue:
            return
        f, args, d = self._queue.popleft()
        if self._broken is not None and f is not self._abort:
            d.errback(self._broken)
            self._next()
            return
        self._busy = True
        step = self._store.run(f, *args)

        def done(result):
            self._busy = False
            if isinstance(result, Exception) or hasattr(result, "check"):
                self._broken = result if f is not self._abort else self._broken
            self._next()
            return result

        step.addBoth(done)
        step.chainDeferred(d)

    # -- in a blob thread ---------------------------------------------------------

    def _open(self):
        os.makedirs(self._store.spool_dir, exist_ok=True)
        self._handle = open(self._path, "xb")

    def _write(self, data):
        if self._handle is None:
            self._open()
        self._handle.write(data)
        self._handle.flush()  # to the OS now: the file's mtime says it is alive

    def _commit(self, target):
        if self._handle is None:
            self._open()
        handle, self._handle = self._handle, None
        try:
            handle.flush()
            os.fsync(handle.fileno())
            size = handle.tell()
        finally:
            handle.close()
        os.replace(self._path, target)
        return size

    def _abort(self):
        handle, self._handle = self._handle, None
        if handle is not None:
            handle.close()
        _unlink(self._path)


def _disk(f, *args):
    try:
        return f(*args)
    except OSError as e:
        raise StorageUnavailable(f"The gateway's storage failed ({e.strerror or e}).") from e


def _mtime(path):
    try:
        return os.stat(path).st_mtime
    except FileNotFoundError:
        return float("inf")


def _unlink(path):
    try:
        os.unlink(path)
        return True
    except FileNotFoundError:
        return False
