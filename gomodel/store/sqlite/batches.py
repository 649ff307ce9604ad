"""L{IBatchStore} on SQLite: batches, their requests and results, and their claims.

A batch is claimed by the process that runs it: C{owner}, C{lease_until}
(seconds on the store's clock) and C{claim_token}, incremented per claim.
A batch nobody holds keeps in C{lease_until} when it became free (added,
released, or its lease ran out): a busy claimer takes only batches free
for long enough (C{free_for}), leaving fresh ones to idler processes.
Writes by the runner carry the token and change nothing once it is stale
(a fencing token), so a process that lost its lease (paused, partitioned)
can never record a result after another one took the batch over.

SQLite runs each claim in one C{BEGIN IMMEDIATE} transaction (one writer at
a time); a PostgreSQL twin selects the candidate with C{FOR UPDATE SKIP
LOCKED} and runs the same C{UPDATE}.
"""

from zope.interface import implementer

from gomodel.store.codec import decode_json, encode_record
from gomodel.store.interfaces import IBatchStore
from gomodel.store.records import (UNFINISHED, FileResultsSQL, LeaseLost, drop_file_results, duplicates_query,
                                   tenant_list, within_bytes)
from gomodel.store.sqlite.rows import insert_rows, marks
from gomodel.store.sqlite.files import insert_file

BATCH_COLUMNS = (
    "id", "endpoint", "input_file_id", "completion_window", "status", "output_file_id", "error_file_id",
    "created_at", "in_progress_at", "expires_at", "finalizing_at", "completed_at", "failed_at", "expired_at",
    "cancelling_at", "cancelled_at", "total", "completed", "failed", "errors", "metadata", "tenant", "auth_key_id",
    "output_expires_after", "token_usage", "model", "kind",
)
_JSON = ("errors", "metadata", "token_usage")
_SELECT = f"SELECT {', '.join(BATCH_COLUMNS)} FROM batches"
# A lease anyone may take: none, or over by ? (a NULL owner with a future lease_until is a backoff).
_FREE = "(lease_until IS NULL OR lease_until <= ?)"
_DUPLICATES = duplicates_query("?")
# The batches (id, kind, ok) whose output (ok: 1) or error file (0) a file is, with an expiry (by their indexes),
# and the results that file holds (by their key); a message batch's error file holds none of its unanswered ones.
FILE_BATCHES = ("SELECT id, kind, 1 FROM batches WHERE output_file_id = ? AND output_expires_after IS NOT NULL "
                "UNION ALL SELECT id, kind, 0 FROM batches WHERE error_file_id = ? AND output_expires_after IS NOT NULL")
DROP_RESULTS = "DELETE FROM batch_results WHERE batch_id = ? AND ok = ?"
DROP_ANSWERED = "DELETE FROM batch_results WHERE batch_id = ? AND ok = 0 AND instr(data, ?) = 0 AND instr(data, ?) = 0"
_FILE_RESULTS = FileResultsSQL("SELECT purpose FROM files WHERE id = ?", FILE_BATCHES, DROP_RESULTS, DROP_ANSWERED)


@implementer(IBatchStore)
class SQLiteBatchStore:
    """Batches in C{batches}, C{batch_requests} and C{batch_results}."""

    def __init__(self, db):
        self._db = db

    # -- records ----------------------------------------------------------------

    def add(self, batch):
        return self._db.run(self._add, dict(batch), self._db.now())

    def _add(self, batch, now):
        values = dict(_encode(batch), lease_until=now)  # unclaimed, free since now
        with self._db.transaction() as conn:
            conn.execute(f"INSERT INTO batches ({', '.join(values)}) VALUES ({marks(values)})",
                         tuple(values.values()))
        return self._get(batch["id"])

    def get(self, batch_id):
        return self._db.run(self._get, batch_id)

    def _get(self, batch_id):
        row = self._db.conn().execute(f"{_SELECT} WHERE id = ?", (batch_id,)).fetchone()
        return _decode(row) if row is not None else None

    def list(self, after=None, limit=20, tenant=None, kind=None):
        return self._db.run(self._list, after, limit, tenant, kind)

    def _list(self, after, limit, tenant, kind):
        conn = self._db.conn()
        where, args = [], []
        tenants = tenant_list(tenant)
        if tenants:
            where.append(f"tenant IN ({marks(tenants)})")
            args.extend(tenants)
        if kind is not None:
            where.append("kind = ?")
            args.append(kind)
        if after is not None:
            # (an item of this listing: another tenant's id is as unknown)
            row = conn.execute(f"SELECT seq FROM batches WHERE {' AND '.join(['id = ?', *where])}",
                               (after, *args)).fetchone()
            if row is None:
                return [], False
            where.append("seq < ?")
            args.append(row[0])
        sql = f"{_SELECT}{' WHERE ' + ' AND '.join(where) if where else ''} ORDER BY seq DESC LIMIT ?"
        rows = conn.execute(sql, (*args, limit + 1)).fetchall()
        return [_decode(r) for r in rows[:limit]], len(rows) > limit

    def delete(self, batch_id, only_if_status):
        return self._db.run(self._delete, batch_id, tuple(only_if_status))

    def _delete(self, batch_id, only_if_status):
        with self._db.transaction() as conn:
            row = conn.execute(f"{_SELECT} WHERE id = ? AND status IN ({marks(only_if_status)})",
                               (batch_id, *only_if_status)).fetchone()
            if row is None:
                return None
            for table in ("batch_results", "batch_requests"):
                conn.execute(f"DELETE FROM {table} WHERE batch_id = ?", (batch_id,))
            conn.execute("DELETE FROM batches WHERE id = ?", (batch_id,))
        return _decode(row)

    def update(self, batch_id, changes, only_if_status=None, token=None):
        return self._db.run(self._update, batch_id, dict(changes), only_if_status, token)

    def _update(self, batch_id, changes, only_if_status, token):
        with self._db.transaction() as conn:
            if not _apply(conn, batch_id, changes, only_if_status, token):
                return None
        return self._get(batch_id)

    def unfinished(self):
        return self._db.run(self._unfinished)

    def _unfinished(self):
        rows = self._db.conn().execute(f"{_SELECT} WHERE status IN ({marks(UNFINISHED)}) ORDER BY seq",
                                       UNFINISHED).fetchall()
        return [_decode(r) for r in rows]

    # -- claims -------------------------------------------------------------------

    def claim(self, batch_id, owner, lease):
        return self._db.run(self._claim, batch_id, owner, self._db.now(), lease, (), (), 0)

    def claim_next(self, owner, lease, exclude=(), gone=(), free_for=0):
        return self._db.run(self._claim, None, owner, self._db.now(), lease, tuple(exclude), tuple(gone), free_for)

    def holders(self):
        return self._db.run(self._holders, self._db.now())

    def _holders(self, now):
        return {r[0] for r in self._db.conn().execute(
            f"SELECT DISTINCT owner FROM batches WHERE status IN ({marks(UNFINISHED)}) AND owner IS NOT NULL "
            "AND lease_until > ?", (*UNFINISHED, now))}

    def _claim(self, batch_id, owner, now, lease, exclude, gone, free_for):
        free, free_args = _FREE, [now - free_for]
        if gone:
            free = f"({_FREE} OR owner IN ({marks(gone)}))"
            free_args.extend(gone)
        with self._db.transaction() as conn:
            if batch_id is None:
                # PostgreSQL: the same SELECT ... FOR UPDATE SKIP LOCKED.
                sql = f"SELECT id FROM batches WHERE status IN ({marks(UNFINISHED)}) AND {free}"
                args = [*UNFINISHED, *free_args]
                if exclude:
                    sql += f" AND id NOT IN ({marks(exclude)})"
                    args.extend(exclude)
                row = conn.execute(sql + " ORDER BY seq LIMIT 1", args).fetchone()
                if row is None:
                    return None
                batch_id = row[0]
            taken = conn.execute(
                "UPDATE batches SET owner = ?, lease_until = ?, claim_token = claim_token + 1 "
                f"WHERE id = ? AND status IN ({marks(UNFINISHED)}) AND ({free} OR owner = ?)",
                (owner, now + lease, batch_id, *UNFINISHED, *free_args, owner)).rowcount
            if not taken:
                return None
            token = conn.execute("SELECT claim_token FROM batches WHERE id = ?", (batch_id,)).fetchone()[0]
        return self._get(batch_id), token

    def renew(self, batch_id, owner, token, lease):
        return self._db.run(self._renew, batch_id, owner, token, self._db.now() + lease)

    def _renew(self, batch_id, owner, token, until):
        with self._db.transaction() as conn:
            return conn.execute("UPDATE batches SET lease_until = ? WHERE id = ? AND owner = ? AND claim_token = ?",
                                (until, batch_id, owner, token)).rowcount > 0

    def release(self, batch_id, owner, token, delay=0):
        until = self._db.now() + max(0, delay)  # free from then
        return self._db.run(self._release, batch_id, owner, token, until)

    def _release(self, batch_id, owner, token, until):
        with self._db.transaction() as conn:
            conn.execute("UPDATE batches SET owner = NULL, lease_until = ? WHERE id = ? AND owner = ? "
                         "AND claim_token = ?", (until, batch_id, owner, token))

    # -- requests and results ------------------------------------------------------

    def add_requests(self, batch_id, requests, token):
        return self._db.run(self._add_requests, batch_id, list(requests), token)

    def _add_requests(self, batch_id, requests, token):
        with self._db.transaction() as conn:
            _fence(conn, batch_id, token)
            insert_rows(conn, "INSERT INTO batch_requests (batch_id, line, custom_id, body) VALUES",
                        [(batch_id, line, cid, body) for line, cid, body in requests],
                        "ON CONFLICT (batch_id, line) DO UPDATE SET custom_id = excluded.custom_id, body = excluded.body")

    def clear_requests(self, batch_id, token=None):
        return self._db.run(self._clear_requests, batch_id, token)

    def _clear_requests(self, batch_id, token):
        with self._db.transaction() as conn:
            if token is not None:
                _fence(conn, batch_id, token)
            conn.execute("DELETE FROM batch_requests WHERE batch_id = ?", (batch_id,))

    def duplicates(self, batch_id, limit):
        return self._db.run(self._duplicates, batch_id, limit)

    def _duplicates(self, batch_id, limit):
        return [tuple(r) for r in self._db.conn().execute(_DUPLICATES, (batch_id, limit)).fetchall()]

    def pending(self, batch_id, after_line, limit, max_bytes=None):
        return self._db.run(self._pending, batch_id, after_line, limit, max_bytes)

    def _pending(self, batch_id, after_line, limit, max_bytes):
        conn = self._db.conn()
        where, args = ("r.batch_id = ? AND r.line > ? AND NOT EXISTS "
                       "(SELECT 1 FROM batch_results s WHERE s.batch_id = r.batch_id AND s.line = r.line)"), \
            [batch_id, after_line]
        bounded = within_bytes(conn, "batch_requests r", "r.line", "length(r.body)", where, args, limit, max_bytes, "?")
        if bounded is None:
            return []
        where, args = bounded
        rows = conn.execute(f"SELECT r.line, r.custom_id, r.body FROM batch_requests r WHERE {where} "
                            "ORDER BY r.line LIMIT ?", (*args, limit)).fetchall()
        return [(r[0], r[1], bytes(r[2])) for r in rows]

    def record_results(self, batch_id, results, token):
        return self._db.run(self._record_results, batch_id, list(results), token)

    def _record_results(self, batch_id, results, token):
        completed = failed = 0
        with self._db.transaction() as conn:
            _fence(conn, batch_id, token)
            for line, custom_id, ok, data in results:
                inserted = conn.execute(
                    "INSERT INTO batch_results (batch_id, line, custom_id, ok, data) VALUES (?, ?, ?, ?, ?) "
                    "ON CONFLICT (batch_id, line) DO NOTHING",
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

    def read_results(self, batch_id, after_line, limit, ok=None, max_bytes=None):
        return self._db.run(self._read_results, batch_id, after_line, limit, ok, max_bytes)

    def _read_results(self, batch_id, after_line, limit, ok, max_bytes):
        conn = self._db.conn()
        where, args = "batch_id = ? AND line > ?", [batch_id, after_line]
        if ok is not None:
            where += " AND ok = ?"
            args.append(1 if ok else 0)
        bounded = within_bytes(conn, "batch_results", "line", "length(data)", where, args, limit, max_bytes, "?")
        if bounded is None:
            return []
        where, args = bounded
        rows = conn.execute(f"SELECT line, custom_id, ok, data FROM batch_results WHERE {where} ORDER BY line LIMIT ?",
                            (*args, limit)).fetchall()
        return [(r[0], r[1], bool(r[2]), bytes(r[3])) for r in rows]

    def drop_file_results(self, file_id, kind=None):
        return self._db.run(self._drop_file_results, file_id, kind)

    def _drop_file_results(self, file_id, kind):
        with self._db.transaction() as conn:
            return drop_file_results(conn, file_id, kind, _FILE_RESULTS)

    def finalize(self, batch_id, changes, files, only_if_status=None, token=None):
        return self._db.run(self._finalize, batch_id, dict(changes), dict(files), only_if_status, token,
                            int(self._db.now()))

    def _finalize(self, batch_id, changes, files, only_if_status, token, now):
        ids = {kind: (files.get(kind) or (None, 0))[0] for kind in ("output", "error")}
        with self._db.transaction() as conn:
            if not _apply(conn, batch_id, dict(changes, output_file_id=ids["output"], error_file_id=ids["error"]),
                          only_if_status, token):
                return None
            tenant, expiry = conn.execute("SELECT tenant, output_expires_after FROM batches WHERE id = ?",
                                          (batch_id,)).fetchone()
            for kind in ("output", "error"):  # the batch's tenant owns its output
                if files.get(kind) is not None:
                    file_id, size = files[kind]
                    insert_file(conn, file_id, size, now, f"{batch_id}_{kind}.jsonl", "batch_output", tenant,
                                None if expiry is None else now + expiry)
            conn.execute("DELETE FROM batch_requests WHERE batch_id = ?", (batch_id,))
        return self._get(batch_id)


def _fence(conn, batch_id, token):
    row = conn.execute("SELECT claim_token FROM batches WHERE id = ?", (batch_id,)).fetchone()
    if row is None or row[0] != token:
        raise LeaseLost(f"batch {batch_id}: claim token {token} is stale")


def _apply(conn, batch_id, changes, only_if_status, token):
    values = _encode(changes)
    sql = f"UPDATE batches SET {', '.join(f'{k} = ?' for k in values)} WHERE id = ?"
    args = [*values.values(), batch_id]
    if only_if_status:
        sql += f" AND status IN ({marks(only_if_status)})"
        args.extend(only_if_status)
    if token is not None:
        sql += " AND claim_token = ?"
        args.append(token)
    return conn.execute(sql, args).rowcount > 0


def _encode(batch):
    return encode_record(batch, BATCH_COLUMNS, _JSON)


def _decode(row):
    return decode_json(dict(row), _JSON)
