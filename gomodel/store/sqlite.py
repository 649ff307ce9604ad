"""The default store: one SQLite database under the data directory, file contents beside it.

Layout of C{GOMODEL_DATA_DIR}::

    gomodel.db            files, batches, batch requests and results (WAL journal)
    files/<file_id>       the contents of each file
    files/.spool/<run>/   uploads being received, one directory per run (older ones removed at start)

All database and file work runs in one dedicated thread (a L{ThreadPool} of
one), so the reactor never waits on the disk and the database sees one writer.
The schema is created and migrated when the service starts; C{schema_version}
holds the number of the last migration applied.
"""

import json
import os
import shutil
import sqlite3
import uuid
from contextlib import contextmanager

from twisted.application.service import Service
from twisted.internet.defer import fail
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool
from zope.interface import implementer

from gomodel import jsonutil
from gomodel.errors import StorageUnavailable
from gomodel.store.interfaces import UNFINISHED, IStore

DB_NAME = "gomodel.db"
COPY_CHUNK = 1024 * 1024

# Ordered migrations: (version, statements). Never edit a released one; append.
MIGRATIONS = (
    (1, (
        """CREATE TABLE files (
            seq INTEGER PRIMARY KEY AUTOINCREMENT,
            id TEXT NOT NULL UNIQUE,
            bytes INTEGER NOT NULL,
            created_at INTEGER NOT NULL,
            filename TEXT NOT NULL,
            purpose TEXT NOT NULL,
            status TEXT NOT NULL DEFAULT 'processed',
            expires_at INTEGER
        )""",
        "CREATE INDEX files_purpose ON files (purpose, seq)",
        """CREATE TABLE batches (
            seq INTEGER PRIMARY KEY AUTOINCREMENT,
            id TEXT NOT NULL UNIQUE,
            endpoint TEXT NOT NULL,
            input_file_id TEXT NOT NULL,
            completion_window TEXT NOT NULL,
            status TEXT NOT NULL,
            output_file_id TEXT,
            error_file_id TEXT,
            created_at INTEGER NOT NULL,
            in_progress_at INTEGER,
            expires_at INTEGER,
            finalizing_at INTEGER,
            completed_at INTEGER,
            failed_at INTEGER,
            expired_at INTEGER,
            cancelling_at INTEGER,
            cancelled_at INTEGER,
            total INTEGER NOT NULL DEFAULT 0,
            completed INTEGER NOT NULL DEFAULT 0,
            failed INTEGER NOT NULL DEFAULT 0,
            errors TEXT,
            metadata TEXT
        )""",
        "CREATE INDEX batches_status ON batches (status)",
        # One row per validated input line; dropped once the batch is finalized.
        """CREATE TABLE batch_requests (
            batch_id TEXT NOT NULL,
            line INTEGER NOT NULL,
            custom_id TEXT NOT NULL,
            body BLOB NOT NULL,
            PRIMARY KEY (batch_id, line)
        ) WITHOUT ROWID""",
        # One row per answered line: the primary key makes each line's result exactly-once.
        """CREATE TABLE batch_results (
            batch_id TEXT NOT NULL,
            line INTEGER NOT NULL,
            custom_id TEXT NOT NULL,
            ok INTEGER NOT NULL,
            data BLOB NOT NULL,
            PRIMARY KEY (batch_id, line)
        ) WITHOUT ROWID""",
    )),
    (2, (
        # Responses created through the gateway: their input, who made them, their output.
        """CREATE TABLE responses (
            id TEXT PRIMARY KEY,
            provider TEXT NOT NULL,
            created_at INTEGER NOT NULL,
            previous_response_id TEXT,
            status TEXT,
            input_items TEXT NOT NULL,
            response TEXT NOT NULL
        )""",
        "CREATE INDEX responses_created ON responses (created_at)",
    )),
)

_FILE_COLUMNS = ("id", "bytes", "created_at", "filename", "purpose", "status", "expires_at")
_BATCH_COLUMNS = (
    "id", "endpoint", "input_file_id", "completion_window", "status", "output_file_id", "error_file_id",
    "created_at", "in_progress_at", "expires_at", "finalizing_at", "completed_at", "failed_at", "expired_at",
    "cancelling_at", "cancelled_at", "total", "completed", "failed", "errors", "metadata",
)
_BATCH_JSON = ("errors", "metadata")


def new_file_id() -> str:
    return "file-" + uuid.uuid4().hex


@implementer(IStore)
class SQLiteStore(Service):
    """L{IStore} on SQLite, as a service: open and migrate at start, close at stop."""

    log = Logger()

    def __init__(self, data_dir, reactor, clock=None, *, sweep=True):
        """
        @param sweep: remove leftovers of earlier runs at start (uploads cut
            short, contents no record names). Only one process sharing the
            data directory may do it (the others could be writing).
        """
        self._sweeping = sweep
        self.data_dir = os.path.abspath(data_dir)
        self.db_path = os.path.join(self.data_dir, DB_NAME)
        self.files_dir = os.path.join(self.data_dir, "files")
        self._spool_root = os.path.join(self.files_dir, ".spool")
        # Uploads of this run only: the start-up sweep (in the store thread)
        # removes other runs' leftovers without racing an upload in progress.
        self.spool_dir = os.path.join(self._spool_root, uuid.uuid4().hex)
        self._reactor = reactor
        self._clock = clock if clock is not None else reactor
        self._pool = ThreadPool(minthreads=1, maxthreads=1, name="gomodel-store")
        self._conn = None
        self._broken = None
        self._started = None
        self._shutdown_trigger = None

    # -- service --------------------------------------------------------------

    def startService(self):
        super().startService()
        self._pool.start()
        # A safety net: the store's thread must never keep a stopping process alive.
        self._shutdown_trigger = self._reactor.addSystemEventTrigger("during", "shutdown", self._stop_pool, True)
        self._started = self._run(self._open)

        def failed(failure):
            self.log.failure("cannot open the store in {data_dir}: files and batches are unavailable",
                             failure, data_dir=self.data_dir)

        self._started.addErrback(failed)

    def stopService(self):
        super().stopService()
        d = self._run(self._close)
        d.addErrback(lambda f: self.log.failure("closing the store", f))
        d.addBoth(lambda _: self._stop_pool())  # the thread is idle now: joining it is immediate
        return d

    def _stop_pool(self, shutting_down=False):
        trigger, self._shutdown_trigger = self._shutdown_trigger, None
        if trigger is not None:
            if not shutting_down:
                self._reactor.removeSystemEventTrigger(trigger)
            self._pool.stop()

    def started(self):
        if self._started is None:
            raise RuntimeError("the store service was not started")
        d = self._run(self._db)  # queued behind the opening job
        d.addCallback(lambda _: None)
        return d

    def _run(self, f, *args):
        if self._pool.joined:  # stopped: a late caller gets an answer, not an exception
            return fail(StorageUnavailable("The gateway's storage is unavailable (the gateway is stopping)."))
        return deferToThreadPool(self._reactor, self._pool, f, *args)

    # -- in the store thread ----------------------------------------------------

    def _open(self):
        conn = None
        try:
            os.makedirs(self.spool_dir, exist_ok=True)
            conn = sqlite3.connect(self.db_path, isolation_level=None, check_same_thread=False)
            conn.row_factory = sqlite3.Row
            conn.execute("PRAGMA journal_mode=WAL")
            # WAL + NORMAL: a committed transaction survives a killed process; only
            # an OS crash or power loss can take back the last ones.
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute("PRAGMA busy_timeout=5000")
            _migrate(conn)
        except Exception as e:
            self._broken = str(e) or type(e).__name__  # what every later call answers with
            if conn is not None:
                conn.close()
            raise
        self._conn = conn
        if self._sweeping:
            self._sweep()

    def _close(self):
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()
        shutil.rmtree(self.spool_dir, ignore_errors=True)  # this run's uploads that were cut short

    def _db(self):
        if self._conn is None:
            reason = self._broken or "the store is not open"
            raise StorageUnavailable(f"The gateway's storage is unavailable ({reason}).")
        return self._conn

    @contextmanager
    def _transaction(self):
        conn = self._db()
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield conn
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")

    def _sweep(self):
        """Remove half-received uploads and contents no record names (a crash mid-write)."""
        for name in os.listdir(self._spool_root):
            if os.path.join(self._spool_root, name) != self.spool_dir:
                shutil.rmtree(os.path.join(self._spool_root, name), ignore_errors=True)
        known = {row[0] for row in self._conn.execute("SELECT id FROM files")}
        for name in os.listdir(self.files_dir):
            if name.startswith("file-") and name not in known:
                _unlink(os.path.join(self.files_dir, name))

    def _content_path(self, file_id):
        if "/" in file_id or os.sep in file_id or file_id in (".", ".."):
            raise ValueError("bad file id")
        return os.path.join(self.files_dir, file_id)

    def _now(self):
        return int(self._clock.seconds())

    # -- files ----------------------------------------------------------------

    def add_file(self, source_path, filename, purpose):
        return self._run(self._add_file, source_path, filename, purpose, self._now())

    def _add_file(self, source_path, filename, purpose, now):
        self._db()
        file_id = new_file_id()
        target = self._content_path(file_id)
        _fsync_path(source_path)
        size = os.path.getsize(source_path)
        os.replace(source_path, target)
        try:
            with self._transaction() as conn:
                conn.execute("INSERT INTO files (id, bytes, created_at, filename, purpose) VALUES (?, ?, ?, ?, ?)",
                             (file_id, size, now, filename, purpose))
        except BaseException:
            _unlink(target)
            raise
        return self._get_file(file_id)

    def get_file(self, file_id):
        return self._run(self._get_file, file_id)

    def _get_file(self, file_id):
        row = self._db().execute(f"SELECT {', '.join(_FILE_COLUMNS)} FROM files WHERE id = ?", (file_id,)).fetchone()
        return dict(row) if row is not None else None

    def list_files(self, purpose=None, after=None, limit=10000, order="desc"):
        return self._run(self._list_files, purpose, after, limit, order)

    def _list_files(self, purpose, after, limit, order):
        conn = self._db()
        where, args = [], []
        if purpose is not None:
            where.append("purpose = ?")
            args.append(purpose)
        if after is not None:
            row = conn.execute("SELECT seq FROM files WHERE id = ?", (after,)).fetchone()
            if row is None:
                return [], False
            where.append("seq < ?" if order == "desc" else "seq > ?")
            args.append(row[0])
        direction = "DESC" if order == "desc" else "ASC"
        sql = (f"SELECT {', '.join(_FILE_COLUMNS)} FROM files"
               f"{' WHERE ' + ' AND '.join(where) if where else ''} ORDER BY seq {direction} LIMIT ?")
        rows = conn.execute(sql, (*args, limit + 1)).fetchall()
        return [dict(r) for r in rows[:limit]], len(rows) > limit

    def delete_file(self, file_id):
        return self._run(self._delete_file, file_id)

    def _delete_file(self, file_id):
        with self._transaction() as conn:
            deleted = conn.execute("DELETE FROM files WHERE id = ?", (file_id,)).rowcount
        if deleted:
            _unlink(self._content_path(file_id))
        return bool(deleted)

    def open_file(self, file_id):
        return self._run(self._open_file, file_id)

    def _open_file(self, file_id):
        handle = self._open_content(file_id)
        if handle is None:
            return None
        return handle, os.fstat(handle.fileno()).st_size

    def _open_content(self, file_id):
        """The contents of a known file, opened for reading, or None."""
        if self._get_file(file_id) is None:
            return None
        try:
            return open(self._content_path(file_id), "rb")
        except FileNotFoundError:
            return None

    def read_lines(self, file_id, offset, max_lines, max_line_bytes):
        return self._run(self._read_lines, file_id, offset, max_lines, max_line_bytes)

    def _read_lines(self, file_id, offset, max_lines, max_line_bytes):
        handle = self._open_content(file_id)
        if handle is None:
            return None
        lines = []
        with handle:
            handle.seek(offset)
            while len(lines) < max_lines:
                line = handle.readline(max_line_bytes + 2)
                if not line:
                    return lines, None
                if not line.endswith(b"\n") and len(line) > max_line_bytes:
                    while line and not line.endswith(b"\n"):  # skip the rest of an over-long line
                        line = handle.readline(COPY_CHUNK)
                    lines.append(None)
                    continue
                lines.append(line.rstrip(b"\r\n"))
            return lines, handle.tell()

    # -- batches --------------------------------------------------------------

    def add_batch(self, batch):
        return self._run(self._add_batch, dict(batch))

    def _add_batch(self, batch):
        values = _encode_batch(batch)
        with self._transaction() as conn:
            conn.execute(f"INSERT INTO batches ({', '.join(values)}) VALUES ({', '.join('?' for _ in values)})",
                         tuple(values.values()))
        return self._get_batch(batch["id"])

    def get_batch(self, batch_id):
        return self._run(self._get_batch, batch_id)

    def _get_batch(self, batch_id):
        row = self._db().execute(f"SELECT {', '.join(_BATCH_COLUMNS)} FROM batches WHERE id = ?",
                                 (batch_id,)).fetchone()
        return _decode_batch(row) if row is not None else None

    def list_batches(self, after=None, limit=20):
        return self._run(self._list_batches, after, limit)

    def _list_batches(self, after, limit):
        conn = self._db()
        if after is not None:
            row = conn.execute("SELECT seq FROM batches WHERE id = ?", (after,)).fetchone()
            if row is None:
                return [], False
            rows = conn.execute(f"SELECT {', '.join(_BATCH_COLUMNS)} FROM batches WHERE seq < ? "
                                "ORDER BY seq DESC LIMIT ?", (row[0], limit + 1)).fetchall()
        else:
            rows = conn.execute(f"SELECT {', '.join(_BATCH_COLUMNS)} FROM batches ORDER BY seq DESC LIMIT ?",
                                (limit + 1,)).fetchall()
        return [_decode_batch(r) for r in rows[:limit]], len(rows) > limit

    def update_batch(self, batch_id, changes, only_if_status=None):
        return self._run(self._update_batch, batch_id, dict(changes), only_if_status)

    def _update_batch(self, batch_id, changes, only_if_status):
        with self._transaction() as conn:
            if not _apply(conn, batch_id, changes, only_if_status):
                return None
        return self._get_batch(batch_id)

    def unfinished_batches(self):
        return self._run(self._unfinished_batches)

    def _unfinished_batches(self):
        marks = ", ".join("?" for _ in UNFINISHED)
        rows = self._db().execute(f"SELECT {', '.join(_BATCH_COLUMNS)} FROM batches WHERE status IN ({marks}) "
                                  "ORDER BY seq", UNFINISHED).fetchall()
        return [_decode_batch(r) for r in rows]

    def add_batch_requests(self, batch_id, requests):
        return self._run(self._add_batch_requests, batch_id, list(requests))

    def _add_batch_requests(self, batch_id, requests):
        with self._transaction() as conn:
            conn.executemany("INSERT OR REPLACE INTO batch_requests (batch_id, line, custom_id, body) "
                             "VALUES (?, ?, ?, ?)", [(batch_id, line, cid, body) for line, cid, body in requests])

    def clear_batch_requests(self, batch_id):
        return self._run(self._clear_batch_requests, batch_id)

    def _clear_batch_requests(self, batch_id):
        with self._transaction() as conn:
            conn.execute("DELETE FROM batch_requests WHERE batch_id = ?", (batch_id,))

    def pending_requests(self, batch_id, after_line, limit):
        return self._run(self._pending_requests, batch_id, after_line, limit)

    def _pending_requests(self, batch_id, after_line, limit):
        rows = self._db().execute(
            "SELECT r.line, r.custom_id, r.body FROM batch_requests r WHERE r.batch_id = ? AND r.line > ? "
            "AND NOT EXISTS (SELECT 1 FROM batch_results s WHERE s.batch_id = r.batch_id AND s.line = r.line) "
            "ORDER BY r.line LIMIT ?", (batch_id, after_line, limit)).fetchall()
        return [(r[0], r[1], bytes(r[2])) for r in rows]

    def record_results(self, batch_id, results):
        return self._run(self._record_results, batch_id, list(results))

    def _record_results(self, batch_id, results):
        completed = failed = 0
        with self._transaction() as conn:
            for line, custom_id, ok, data in results:
                inserted = conn.execute(
                    "INSERT OR IGNORE INTO batch_results (batch_id, line, custom_id, ok, data) VALUES (?, ?, ?, ?, ?)",
                    (batch_id, line, custom_id, 1 if ok else 0, data)).rowcount
                if inserted:
                    if ok:
                        completed += 1
                    else:
                        failed += 1
            if completed or failed:
                conn.execute("UPDATE batches SET completed = completed + ?, failed = failed + ? WHERE id = ?",
                             (completed, failed, batch_id))
        return completed + failed

    # -- responses ------------------------------------------------------------

    def put_response(self, record):
        return self._run(self._put_response, dict(record))

    def keep_response(self, record):
        if self._pool.joined:
            self.log.warn("response {id} not stored: the gateway is stopping", id=record["id"])
            return
        # No Deferred: nothing wakes the reactor for a write nobody waits for.
        self._pool.callInThread(self._keep_response, dict(record))

    def _keep_response(self, record):
        try:
            self._put_response(record)
        except Exception:
            self._reactor.callFromThread(self.log.failure, "storing response {id} failed", Failure(),
                                         id=record["id"])

    def _put_response(self, record):
        raw = record.get("response_json")
        with self._transaction() as conn:
            conn.execute(
                "INSERT OR REPLACE INTO responses (id, provider, created_at, previous_response_id, status, "
                "input_items, response) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (record["id"], record["provider"], record["created_at"], record.get("previous_response_id"),
                 record.get("status"), jsonutil.dumps(record["input_items"]).decode("utf-8"),
                 raw.decode("utf-8") if raw is not None else jsonutil.dumps(record["response"]).decode("utf-8")))

    def get_response(self, response_id):
        return self._run(self._get_response, response_id)

    def _get_response(self, response_id):
        row = self._db().execute("SELECT id, provider, created_at, previous_response_id, status, input_items, "
                                 "response FROM responses WHERE id = ?", (response_id,)).fetchone()
        return _decode_response(row) if row is not None else None

    def delete_response(self, response_id):
        return self._run(self._delete_response, response_id)

    def _delete_response(self, response_id):
        with self._transaction() as conn:
            return conn.execute("DELETE FROM responses WHERE id = ?", (response_id,)).rowcount > 0

    def delete_responses_before(self, created_at):
        return self._run(self._delete_responses_before, created_at)

    def _delete_responses_before(self, created_at):
        with self._transaction() as conn:
            return conn.execute("DELETE FROM responses WHERE created_at < ?", (created_at,)).rowcount

    def read_results(self, batch_id, after_line, limit):
        return self._run(self._read_results, batch_id, after_line, limit)

    def _read_results(self, batch_id, after_line, limit):
        rows = self._db().execute(
            "SELECT line, custom_id, ok, data FROM batch_results WHERE batch_id = ? AND line > ? "
            "ORDER BY line LIMIT ?", (batch_id, after_line, limit)).fetchall()
        return [(r[0], r[1], bool(r[2]), bytes(r[3])) for r in rows]

    def finalize_batch(self, batch_id, changes, only_if_status=None):
        return self._run(self._finalize_batch, batch_id, dict(changes), only_if_status, self._now())

    def _finalize_batch(self, batch_id, changes, only_if_status, now):
        conn = self._db()
        if only_if_status and self._get_batch(batch_id)["status"] not in only_if_status:
            return None
        written = []  # (file_id, size, filename)
        try:
            ids = {}
            for ok, kind in ((1, "output"), (0, "error")):
                file_id, size = self._write_results(conn, batch_id, ok)
                if file_id is not None:
                    written.append((file_id, size, f"{batch_id}_{kind}.jsonl"))
                ids[kind] = file_id
            with self._transaction() as conn:
                for file_id, size, filename in written:
                    conn.execute("INSERT INTO files (id, bytes, created_at, filename, purpose) VALUES (?, ?, ?, ?, ?)",
                                 (file_id, size, now, filename, "batch_output"))
                changes = dict(changes, output_file_id=ids["output"], error_file_id=ids["error"])
                if not _apply(conn, batch_id, changes, only_if_status):
                    raise _Moved()
                conn.execute("DELETE FROM batch_requests WHERE batch_id = ?", (batch_id,))
        except BaseException as e:
            for file_id, _, _ in written:
                _unlink(self._content_path(file_id))
            if isinstance(e, _Moved):
                return None
            raise
        return self._get_batch(batch_id)

    def _write_results(self, conn, batch_id, ok):
        """Write one kind of result lines to a new content file; (file_id, size), or (None, 0) if none."""
        cursor = conn.execute("SELECT data FROM batch_results WHERE batch_id = ? AND ok = ? ORDER BY line",
                              (batch_id, ok))
        rows = cursor.fetchmany(500)
        if not rows:
            return None, 0
        file_id = new_file_id()
        path = self._content_path(file_id)
        try:
            with open(path, "xb") as out:
                while rows:
                    for (data,) in rows:
                        out.write(data)
                        out.write(b"\n")
                    rows = cursor.fetchmany(500)
                out.flush()
                os.fsync(out.fileno())
                size = out.tell()
        except BaseException:
            _unlink(path)
            raise
        return file_id, size


class _Moved(Exception):
    """The batch left the expected status while its files were being written."""


def _migrate(conn):
    """Bring the schema to the last migration, in one transaction (safe when processes start together)."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        conn.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
        row = conn.execute("SELECT version FROM schema_version").fetchone()
        if row is None:
            conn.execute("INSERT INTO schema_version (version) VALUES (0)")
            current = 0
        else:
            current = row[0]
        latest = MIGRATIONS[-1][0]
        if current > latest:
            raise RuntimeError(f"the database is at schema version {current}, newer than this gateway's {latest}")
        for version, statements in MIGRATIONS:
            if version > current:
                for statement in statements:
                    conn.execute(statement)
                conn.execute("UPDATE schema_version SET version = ?", (version,))
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


def _apply(conn, batch_id, changes, only_if_status):
    values = _encode_batch(changes)
    sql = f"UPDATE batches SET {', '.join(f'{k} = ?' for k in values)} WHERE id = ?"
    args = [*values.values(), batch_id]
    if only_if_status:
        sql += f" AND status IN ({', '.join('?' for _ in only_if_status)})"
        args.extend(only_if_status)
    return conn.execute(sql, args).rowcount > 0


def _encode_batch(batch):
    values = {}
    for key, value in batch.items():
        if key not in _BATCH_COLUMNS:
            raise KeyError(f"unknown batch column {key!r}")
        if key in _BATCH_JSON and value is not None:
            value = json.dumps(value, ensure_ascii=False)
        values[key] = value
    return values


def _decode_response(row):
    record = dict(row)
    record["input_items"] = json.loads(record["input_items"])
    record["response"] = json.loads(record["response"])
    return record


def _decode_batch(row):
    batch = dict(row)
    for key in _BATCH_JSON:
        if batch[key] is not None:
            batch[key] = json.loads(batch[key])
    return batch


def _fsync_path(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _unlink(path):
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
