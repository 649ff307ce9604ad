"""L{IBlobStore} in PostgreSQL: file contents as chunked rows, so every host reads what any host wrote.

Layout: one C{blobs} row per blob (C{id} NULL and C{committed} false while
it is written; C{touched_at} is the last write, in seconds since the epoch)
and its bytes in C{blob_chunks(blob_key, start, data)}, one row per write
(at most C{CHUNK_SIZE} bytes each), keyed by the offset of its first byte.
Each write is its own short transaction, so an upload neither holds a
connection between chunks nor sits in memory; L{IBlobWriter.commit} names
the blob (replacing one of the same id) and makes it visible in one
transaction. Reads fetch the chunks of a byte range, sliced by the server
(C{substring} on out-of-line, uncompressed storage). The orphan sweep goes
by C{touched_at}, as the disk store goes by modification times: a write
still receiving data is never removed.
"""

from collections import deque

from twisted.internet.defer import Deferred, fail, succeed
from twisted.logger import Logger
from zope.interface import implementer

from gomodel.errors import StorageUnavailable
from gomodel.logs import log_failure
from gomodel.store.interfaces import IBlobStore, IBlobWriter

CHUNK_SIZE = 1024 * 1024  # the largest row; a bigger write is split
READ_BLOCK = 64 * 1024  # what read_lines fetches at a time


@implementer(IBlobStore)
class PostgreSQLBlobStore:
    """Blobs in C{blobs} and C{blob_chunks}."""

    log = Logger()

    def __init__(self, db, reactor):
        """
        @param reactor: its C{seconds()} (wall time, as files' modification times) stamps writes.
        """
        self._db = db
        self._reactor = reactor

    def now(self) -> float:
        """Seconds since the epoch, for C{touched_at}."""
        return self._reactor.seconds()

    def create(self):
        return _ChunkWriter(self, self._db)

    def size(self, blob_id):
        return self._db.run(lambda conn: (_find(conn, blob_id) or (None, None))[1])

    def read(self, blob_id, offset, length):
        return self._db.run(self._read, blob_id, offset, length)

    @staticmethod
    def _read(conn, blob_id, offset, length):
        found = _find(conn, blob_id)
        if found is None:
            return None
        return _range(conn, *found, offset, length)

    def read_lines(self, blob_id, offset, max_lines, max_line_bytes, max_bytes=None):
        return self._db.run(self._read_lines, blob_id, offset, max_lines, max_line_bytes, max_bytes)

    @staticmethod
    def _read_lines(conn, blob_id, offset, max_lines, max_line_bytes, max_bytes):
        found = _find(conn, blob_id)
        if found is None:
            return None
        return scan_lines(lambda at, n: _range(conn, *found, at, n), offset, found[1], max_lines, max_line_bytes,
                          max_bytes=max_bytes)

    def delete(self, blob_id):
        return self._db.run(lambda conn: conn.execute("DELETE FROM blobs WHERE id = %s AND committed",
                                                      (blob_id,)).rowcount > 0)

    def stale(self, older_than):
        return self._db.run(lambda conn: [r[0] for r in conn.execute(
            "SELECT id FROM blobs WHERE committed AND touched_at < %s ORDER BY key", (older_than,))])

    def discard_writes(self, older_than):
        return self._db.run(lambda conn: conn.execute(
            "DELETE FROM blobs WHERE NOT committed AND touched_at < %s", (older_than,)).rowcount)


def _find(conn, blob_id):
    """C{(key, size)} of the committed blob C{blob_id}, or None."""
    return conn.execute("SELECT key, size FROM blobs WHERE id = %s AND committed", (blob_id,)).fetchone()


def _range(conn, key, size, offset, length):
    """Bytes C{[offset, offset + length)} of blob C{key} (fewer at its end)."""
    end = min(offset + length, size)
    if offset >= end:
        return b""
    rows = conn.execute(
        "SELECT substring(data FROM (GREATEST(%(offset)s - start, 0) + 1)::int FOR (%(end)s - GREATEST(%(offset)s, start))::int) "
        "FROM blob_chunks WHERE blob_key = %(key)s AND start < %(end)s AND start >= COALESCE("
        "(SELECT max(start) FROM blob_chunks WHERE blob_key = %(key)s AND start <= %(offset)s), 0) ORDER BY start",
        {"offset": offset, "end": end, "key": key}).fetchall()
    return b"".join(bytes(r[0]) for r in rows)


def scan_lines(read, offset, size, max_lines, max_line_bytes, block=READ_BLOCK, max_bytes=None):
    """Lines from byte C{offset} as L{IBlobStore.read_lines} answers them, reading through C{read(at, n)}.

    Reads come a C{block} at a time, a long line's growing with it (so it takes a few, never one per block);
    what a slice returns is copied once. A line is kept when it fits C{max_line_bytes} (plus its line ending);
    a longer one comes back as None and is skipped without being held whole. With C{max_bytes}, lines are
    taken while they hold at most that many bytes together (the first always).
    @return: C{(lines, next offset or None at the end)}.
    """
    lines, buf, pos, at = [], bytearray(), 0, offset  # buf[pos:] holds the bytes from at on
    taken = 0
    limit = max_line_bytes + 2
    while len(lines) < max_lines:
        if at >= size:
            return lines, None
        newline = buf.find(b"\n", pos, pos + limit)
        while newline < 0 and len(buf) - pos < limit and at + len(buf) - pos < size:
            del buf[:pos]  # (the lines taken: dropped once per read, not once per line)
            pos, searched = 0, len(buf)
            data = read(at + len(buf), max(block, min(len(buf), limit - len(buf))))
            if not data:  # (the blob is shorter than it said)
                size = at + len(buf)
                break
            buf += data
            newline = buf.find(b"\n", searched, limit)
        end = newline + 1 if newline >= 0 else min(len(buf), pos + limit)
        line, start = bytes(buf[pos:end]), at
        at, pos = at + end - pos, end
        if not line.endswith(b"\n") and len(line) > max_line_bytes:
            del buf[:pos]
            pos = 0
            while True:  # skip the rest of the over-long line
                if not buf:
                    if at >= size:
                        break
                    buf = bytearray(read(at, block))
                    if not buf:
                        at = size
                        break
                newline = buf.find(b"\n")
                if newline >= 0:
                    del buf[:newline + 1]
                    at += newline + 1
                    break
                at, buf = at + len(buf), bytearray()
            lines.append(None)
            continue
        line = line.rstrip(b"\r\n")
        taken += len(line)
        if max_bytes is not None and lines and taken > max_bytes:
            return lines, start  # (the next slice starts with it)
        lines.append(line)
    return lines, at


@implementer(IBlobWriter)
class _ChunkWriter:
    """Each write is one transaction (its first makes the C{blobs} row), run in order, one at a time."""

    def __init__(self, store, db):
        self._store = store
        self._db = db
        self._key = None  # the blobs row, made by the first write
        self._size = 0
        self._queue = deque()  # (f, args, Deferred) not started yet
        self._busy = False
        self._broken = None
        self._over = False  # committed or aborted

    def write(self, data):
        if self._over:
            return fail(StorageUnavailable("The blob was already committed or discarded."))
        return self._queued(self._write, bytes(data), self._store.now())

    def commit(self, blob_id):
        if self._over:
            return fail(StorageUnavailable("The blob was already committed or discarded."))
        self._over = True
        return self._queued(self._commit, blob_id, self._store.now())

    def abort(self):
        if self._over and not self._queue and not self._busy and self._key is None:
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
        step = self._db.run(f, *args)

        def done(result):
            self._busy = False
            failed = hasattr(result, "check") and f is not self._abort
            if failed:
                self._broken = result.value if result.check(StorageUnavailable) else StorageUnavailable(
                    f"The gateway's storage failed ({result.getErrorMessage()}).")
            self._next()
            if failed:
                raise self._broken
            return result

        step.addBoth(done)
        step.chainDeferred(d)

    # -- in a store thread ----------------------------------------------------------

    def _insert(self, conn, data, now):
        if self._key is None:
            self._key = conn.execute("INSERT INTO blobs (touched_at) VALUES (%s) RETURNING key", (now,)).fetchone()[0]
        size = self._size
        for start in range(0, len(data), CHUNK_SIZE):
            chunk = data[start:start + CHUNK_SIZE]
            conn.execute("INSERT INTO blob_chunks (blob_key, start, data) VALUES (%s, %s, %s)",
                         (self._key, size, chunk))
            size += len(chunk)
        return size

    def _write(self, conn, data, now):
        key = self._key
        try:
            with conn.transaction():
                size = self._insert(conn, data, now)
                conn.execute("UPDATE blobs SET size = %s, touched_at = %s WHERE key = %s", (size, now, self._key))
        except BaseException:
            self._key = key  # a row made by the transaction rolled back is gone (the job may be run again)
            raise
        self._size = size  # only once committed

    def _commit(self, conn, blob_id, now):
        key = self._key
        try:
            with conn.transaction():
                self._insert(conn, b"", now)
                conn.execute("DELETE FROM blobs WHERE id = %s", (blob_id,))  # a blob of that id is replaced
                conn.execute("UPDATE blobs SET id = %s, committed = TRUE, size = %s, touched_at = %s WHERE key = %s",
                             (blob_id, self._size, now, self._key))
        except BaseException:
            self._key = key
            raise
        return self._size

    def _abort(self, conn):
        key, self._key = self._key, None
        if key is not None:
            conn.execute("DELETE FROM blobs WHERE key = %s AND NOT committed", (key,))
