"""Many rows a statement, and the process that writes them.

Run as a script (C{python -I -S rows.py DATABASE}, as L{gomodel.store.sqlite.writer.RowWriter} does:
the standard library only, no site-packages, no gomodel, no Twisted), it is the gateway's row writer:
it reads batches on its standard input and writes each in one transaction, so that binding thousands
of values never holds the gateway's interpreter lock. Each batch is a 4-byte big-endian length, then
that many bytes of C{marshal}, C{(insert, conflict, rows)} (as L{insert_rows} takes them; the gateway
runs the same interpreter); for each, in order, it writes one line on its standard output:

    ok N               the N rows are committed
    rejected MESSAGE   a value cannot be written (nothing of the batch was)
    failed MESSAGE     the database cannot be written now (nothing of the batch was)

It exits once its standard input is closed (the gateway stopped, or died), after the batches
given before; it ignores SIGINT and SIGTERM, which a terminal or a service manager may send
the gateway's whole process group: the gateway's last batch still comes.
"""

import sqlite3
from functools import cache
from itertools import chain


def _null(value):
    return None


# Python's sqlite3 binds an exact int, float or str at once, but sends None and bytes through its
# adapter protocol: two failed attribute lookups (on its PrepareProtocol type, then on the value),
# one of them formatting an AttributeError's message, about 1,600 instructions a value; a usage row
# holds five Nones or more. An adapter that is found at once binds them as they are (NULL, a BLOB:
# bytes(b) is b). Per process, for every SQLite connection in it; none adapts these types otherwise.
sqlite3.register_adapter(type(None), _null)
sqlite3.register_adapter(bytes, bytes)

# What a value the database cannot hold raises (an integer beyond 64 bits, a lone surrogate, a
# constraint): writing the batch again would fail again.
REJECTED = (OverflowError, UnicodeEncodeError, sqlite3.IntegrityError)


def marks(values) -> str:
    """C{?, ?, ...} for C{values}."""
    return ", ".join("?" for _ in values)


# The most rows one INSERT of L{insert_rows} writes.
ROWS_PER_INSERT = 128

# The writer process's pause between two statements of a batch (about 0.4 ms of CPU each, 128 usage
# rows): a batch of a thousand rows is eight short runs, not one of 4-5 ms that takes a core from the
# gateway's processes at once (at c=10 on two cores, chat's p99 at two workers went from 3.9 to 2.7 ms:
# bench/results/2026-12-04-session42.md).
PAUSE = 0.0005


def insert_rows(conn, insert: str, rows: list, conflict: str = "", between=None):
    """Run C{insert} (C{"INSERT INTO t (a, b) VALUES"}), then C{conflict} (an C{ON CONFLICT} clause, or
    nothing), for each of C{rows} (sequences of one length), many rows a statement; C{between}, unless
    None, is called between two statements.

    C{executemany} runs its statement once per row, and around each run gives up the interpreter lock
    and takes it back: while the reactor's thread is busy, a wait for it and a switch away from it, per
    row (a usage flush of 1,000 rows cost the store thread about 30 us of CPU a request, and the reactor's
    thread about 20 more: bench/results/2026-12-04-session38.md). Here the rows of a statement are
    bound in one call and it runs once: L{ROWS_PER_INSERT} rows a statement (fewer where the library
    allows fewer values in one), then what is left in halves (64, 32, ... 1 rows), so that a few shapes of
    statement, each compiled once and kept in the connection's cache, write any number of rows.
    """
    if not rows:
        return
    width = len(rows[0])
    size, most = ROWS_PER_INSERT, conn.getlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER)
    while size > 1 and size * width > most:
        size //= 2
    start = 0
    while start < len(rows):
        while start + size > len(rows):
            size //= 2
        if start and between is not None:
            between()
        conn.execute(_insert(insert, width, size, conflict), list(chain.from_iterable(rows[start:start + size])))
        start += size


@cache
def _insert(insert: str, width: int, rows: int, conflict: str) -> str:
    row = f"({marks(range(width))})"
    return f"{insert} {', '.join([row] * rows)} {conflict}"


def write_batch(conn, insert: str, conflict: str, rows: list, between=None) -> bytes:
    """Write one batch in one transaction (calling C{between} between two statements); the line that answers
    it (without its newline)."""
    try:
        conn.execute("BEGIN IMMEDIATE")
        try:
            insert_rows(conn, insert, rows, conflict, between)
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")
    except REJECTED as e:
        return b"rejected " + _line(e)
    except Exception as e:
        return b"failed " + _line(e)
    return b"ok %d" % len(rows)


def _line(error) -> bytes:
    return " ".join(f"{type(error).__name__}: {error}".split()).encode("utf-8", "replace")


def tune(conn):
    """Set what each of the gateway's connections to its database takes (the store's, the writer's).

    WAL (set in the file) + NORMAL: a committed transaction survives a killed process; only an OS crash or power
    loss can take back the last ones. 256 KiB of page cache: SQLite's default, 2 MiB, took the writer from 18 to
    20 MiB with no write the faster (appends touch the right edge of each B-tree only), and filled in the store's as
    the usage ledger grew (a budget's sums, read every second) and stayed in the process; a page read again beyond
    it comes from the OS's cache.
    """
    conn.execute("PRAGMA synchronous=NORMAL")
    conn.execute("PRAGMA busy_timeout=5000")
    conn.execute("PRAGMA cache_size=-256")


def serve(path, source, sink, between=None):
    """Write each batch read from C{source} (a binary file) into the database at C{path}, answering each
    on C{sink}, until C{source} ends; C{between} is called between two statements of a batch."""
    import struct
    from marshal import loads

    conn = sqlite3.connect(path, isolation_level=None)
    tune(conn)  # (as the gateway's own connection; WAL: set in the file)
    try:
        while True:
            head = source.read(4)
            if len(head) < 4:
                return
            (size,) = struct.unpack(">I", head)
            data = source.read(size)
            if len(data) < size:
                return
            insert, conflict, rows = loads(data)
            sink.write(write_batch(conn, insert, conflict, rows, between) + b"\n")
            sink.flush()
    finally:
        conn.close()


if __name__ == "__main__":
    import signal
    import sys
    import time

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    serve(sys.argv[1], sys.stdin.buffer, sys.stdout.buffer, between=lambda: time.sleep(PAUSE))
