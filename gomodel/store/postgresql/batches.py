"""L{IBatchStore} on PostgreSQL: batches, their requests and results, and their claims.

A free batch is picked with C{SELECT ... FOR UPDATE SKIP LOCKED} (hosts
polling together each get a different one, nobody waits) and taken with
one C{UPDATE} that checks the lease again and increments C{claim_token}.
Fenced writes (results, requests, status changes) lock the batch row and
check the token in the same transaction as the write, so a host that lost
its lease (paused, partitioned, presumed dead) records nothing once
another host claimed the batch; the results' primary key makes each line's
result exactly-once whatever happens around a takeover. A batch nobody
holds keeps in C{lease_until} when it became free (added, released, or its
lease ran out): a busy claimer takes only batches free for long enough
(C{free_for}), leaving fresh ones to idler hosts.
"""

from psycopg.rows import dict_row
from zope.interface import implementer

from gomodel.store.codec import decode_json, encode_record
from gomodel.store.interfaces import IBatchStore
from gomodel.store.postgresql.files import insert_file
from gomodel.store.records import (UNFINISHED, FileResultsSQL, LeaseLost, drop_file_results, duplicates_query,
                                   tenant_list, within_bytes)

BATCH_COLUMNS = (
    "id", "endpoint", "input_file_id", "completion_window", "status", "output_file_id", "error_file_id",
    "created_at", "in_progress_at", "expires_at", "finalizing_at", "completed_at", "failed_at", "expired_at",
    "cancelling_at", "cancelled_at", "total", "completed", "failed", "errors", "metadata", "tenant", "auth_key_id",
    "output_expires_after", "token_usage", "model", "kind",
)
_JSON = ("errors", "metadata", "token_usage")
_SELECT = f"SELECT {', '.join(BATCH_COLUMNS)} FROM batches"
# The batches (id, kind, ok) whose output (ok: true) or error file (false) a file is, with an expiry (by their
# indexes), and the results that file holds (by their key); a message batch's error file holds none of its unanswered.
FILE_BATCHES = ("SELECT id, kind, true FROM batches WHERE output_file_id = %s AND output_expires_after IS NOT NULL "
                "UNION ALL SELECT id, kind, false FROM batches WHERE error_file_id = %s "
                "AND output_expires_after IS NOT NULL")
DROP_RESULTS = "DELETE FROM batch_results WHERE batch_id = %s AND ok = %s"
DROP_ANSWERED = ("DELETE FROM batch_results WHERE batch_id = %s AND NOT ok AND position(%s::bytea in data) = 0 "
                 "AND position(%s::bytea in data) = 0")
_FILE_RESULTS = FileResultsSQL("SELECT purpose FROM files WHERE id = %s", FILE_BATCHES, DROP_RESULTS,
                               DROP_ANSWERED)
_UNFINISHED = list(UNFINISHED)
# A lease anyone may take: none, or over by %s (a NULL owner with a future lease_until is a backoff).
_FREE = "(lease_until IS NULL OR lease_until <= %s)"
_DUPLICATES = duplicates_query("%s")


@implementer(IBatchStore)
class PostgreSQLBatchStore:
    """Batches in C{batches}, C{batch_requests} and C{batch_results}."""

    def __init__(self, db):
        self._db = db

    # -- records ----------------------------------------------------------------

    def add(self, batch):
        return self._db.run(self._add, dict(batch), self._db.now())

    @staticmethod
    def _add(conn, batch, now):
        values = dict(_encode(batch), lease_until=now)  # unclaimed, free since now
        conn.execute(f"INSERT INTO batches ({', '.join(values)}) VALUES ({', '.join('%s' for _ in values)})",
                     tuple(values.values()))
        return _get(conn, batch["id"])

    def get(self, batch_id):
        return self._db.run(_get, batch_id)

    def list(self, after=None, limit=20, tenant=None, kind=None):
        return self._db.run(self._list, after, limit, tenant, kind)

    @staticmethod
    def _list(conn, after, limit, tenant, kind):
        where, args = [], []
        tenants = tenant_list(tenant)
        if tenants:
            where.append("tenant = ANY(%s)")
            args.append(tenants)
        if kind is not None:
            where.append("kind = %s")
            args.append(kind)
        if after is not None:
            # (an item of this listing: another tenant's id is as unknown)
            row = conn.execute(f"SELECT seq FROM batches WHERE {' AND '.join(['id = %s', *where])}",
                               (after, *args)).fetchone()
            if row is None:
                return [], False
            where.append("seq < %s")
            args.append(row[0])
        sql = f"{_SELECT}{' WHERE ' + ' AND '.join(where) if where else ''} ORDER BY seq DESC LIMIT %s"
        rows = conn.cursor(row_factory=dict_row).execute(sql, (*args, limit + 1)).fetchall()
        return [_decode(r) for r in rows[:limit]], len(rows) > limit

    def delete(self, batch_id, only_if_status):
        return self._db.run(self._delete, batch_id, list(only_if_status))

    @staticmethod
    def _delete(conn, batch_id, only_if_status):
        with conn.transaction():  # (whole: a job rolled back by a conflict is run again)
            row = conn.cursor(row_factory=dict_row).execute(
                f"DELETE FROM batches WHERE id = %s AND status = ANY(%s) RETURNING {', '.join(BATCH_COLUMNS)}",
                (batch_id, only_if_status)).fetchone()
            if row is None:
                return None
            for table in ("batch_results", "batch_requests"):
                conn.execute(f"DELETE FROM {table} WHERE batch_id = %s", (batch_id,))
        return _decode(row)

    def update(self, batch_id, changes, only_if_status=None, token=None):
        return self._db.run(self._update, batch_id, dict(changes), only_if_status, token)

    @staticmethod
    def _update(conn, batch_id, changes, only_if_status, token):
        if not _apply(conn, batch_id, changes, only_if_status, token):
            return None
        return _get(conn, batch_id)

    def unfinished(self):
        return self._db.run(self._unfinished)

    @staticmethod
    def _unfinished(conn):
        rows = conn.cursor(row_factory=dict_row).execute(f"{_SELECT} WHERE status = ANY(%s) ORDER BY seq",
                                                         (_UNFINISHED,)).fetchall()
        return [_decode(r) for r in rows]

    # -- claims -------------------------------------------------------------------

    def claim(self, batch_id, owner, lease):
        return self._db.run(self._claim, batch_id, owner, self._db.now(), lease, [], [], 0)

    def claim_next(self, owner, lease, exclude=(), gone=(), free_for=0):
        return self._db.run(self._claim, None, owner, self._db.now(), lease, list(exclude), list(gone), free_for)

    def holders(self):
        return self._db.run(self._holders, self._db.now())

    @staticmethod
    def _holders(conn, now):
        return {r[0] for r in conn.execute(
            "SELECT DISTINCT owner FROM batches WHERE status = ANY(%s) AND owner IS NOT NULL AND lease_until > %s",
            (_UNFINISHED, now))}

    @staticmethod
    def _claim(conn, batch_id, owner, now, lease, exclude, gone, free_for):
        free = f"({_FREE} OR owner = ANY(%s))"
        since = now - free_for
        with conn.transaction():
            if batch_id is None:
                row = conn.execute(
                    f"SELECT id FROM batches WHERE status = ANY(%s) AND {free} AND NOT (id = ANY(%s)) "
                    "ORDER BY seq LIMIT 1 FOR UPDATE SKIP LOCKED", (_UNFINISHED, since, gone, exclude)).fetchone()
                if row is None:
                    return None
                batch_id = row[0]
            row = conn.execute(
                "UPDATE batches SET owner = %s, lease_until = %s, claim_token = claim_token + 1 "
                f"WHERE id = %s AND status = ANY(%s) AND ({free} OR owner = %s) RETURNING claim_token",
                (owner, now + lease, batch_id, _UNFINISHED, since, gone, owner)).fetchone()
            if row is None:
                return None
            return _get(conn, batch_id), row[0]

    def renew(self, batch_id, owner, token, lease):
        return self._db.run(self._renew, batch_id, owner, token, self._db.now() + lease)

    @staticmethod
    def _renew(conn, batch_id, owner, token, until):
        return conn.execute("UPDATE batches SET lease_until = %s WHERE id = %s AND owner = %s AND claim_token = %s",
                            (until, batch_id, owner, token)).rowcount > 0

    def release(self, batch_id, owner, token, delay=0):
        until = self._db.now() + max(0, delay)  # free from then
        return self._db.run(self._release, batch_id, owner, token, until)

    @staticmethod
    def _release(conn, batch_id, owner, token, until):
        conn.execute("UPDATE batches SET owner = NULL, lease_until = %s WHERE id = %s AND owner = %s "
                     "AND claim_token = %s", (until, batch_id, owner, token))

    # -- requests and results ------------------------------------------------------

    def add_requests(self, batch_id, requests, token):
        return self._db.run(self._add_requests, batch_id, list(requests), token)

    @staticmethod
    def _add_requests(conn, batch_id, requests, token):
        with conn.transaction():
            _fence(conn, batch_id, token)
            if requests:
                with conn.cursor() as cursor:
                    cursor.executemany(
                        "INSERT INTO batch_requests (batch_id, line, custom_id, body) VALUES (%s, %s, %s, %s) "
                        "ON CONFLICT (batch_id, line) DO UPDATE SET custom_id = excluded.custom_id, "
                        "body = excluded.body", [(batch_id, line, cid, body) for line, cid, body in requests])

    def clear_requests(self, batch_id, token=None):
        return self._db.run(self._clear_requests, batch_id, token)

    @staticmethod
    def _clear_requests(conn, batch_id, token):
        with conn.transaction():
            if token is not None:
                _fence(conn, batch_id, token)
            conn.execute("DELETE FROM batch_requests WHERE batch_id = %s", (batch_id,))

    def duplicates(self, batch_id, limit):
        return self._db.run(self._duplicates, batch_id, limit)

    @staticmethod
    def _duplicates(conn, batch_id, limit):
        return [tuple(r) for r in conn.execute(_DUPLICATES, (batch_id, limit)).fetchall()]

    def pending(self, batch_id, after_line, limit, max_bytes=None):
        return self._db.run(self._pending, batch_id, after_line, limit, max_bytes)

    @staticmethod
    def _pending(conn, batch_id, after_line, limit, max_bytes):
        where, args = ("r.batch_id = %s AND r.line > %s AND NOT EXISTS "
                       "(SELECT 1 FROM batch_results s WHERE s.batch_id = r.batch_id AND s.line = r.line)"), \
            [batch_id, after_line]
        bounded = within_bytes(conn, "batch_requests r", "r.line", "octet_length(r.body)", where, args, limit, max_bytes,
                               "%s")  # (octet_length reads no TOASTed value)
        if bounded is None:
            return []
        where, args = bounded
        rows = conn.execute(f"SELECT r.line, r.custom_id, r.body FROM batch_requests r WHERE {where} "
                            "ORDER BY r.line LIMIT %s", (*args, limit)).fetchall()
        return [(r[0], r[1], bytes(r[2])) for r in rows]

    def record_results(self, batch_id, results, token):
        return self._db.run(self._record_results, batch_id, list(results), token)

    @staticmethod
    def _record_results(conn, batch_id, results, token):
        completed = failed = 0
        with conn.transaction():
            _fence(conn, batch_id, token)
            for line, custom_id, ok, data in results:
                inserted = conn.execute(
                    "INSERT INTO batch_results (batch_id, line, custom_id, ok, data) VALUES (%s, %s, %s, %s, %s) "
                    "ON CONFLICT (batch_id, line) DO NOTHING", (batch_id, line, custom_id, bool(ok), data)).rowcount
                if inserted:
                    if ok:
                        completed += 1
                    else:
                        failed += 1
            if completed or failed:
                conn.execute("UPDATE batches SET completed = completed + %s, failed = failed + %s WHERE id = %s",
                             (completed, failed, batch_id))
        return completed + failed

    def read_results(self, batch_id, after_line, limit, ok=None, max_bytes=None):
        return self._db.run(self._read_results, batch_id, after_line, limit, ok, max_bytes)

    @staticmethod
    def _read_results(conn, batch_id, after_line, limit, ok, max_bytes):
        where, args = "batch_id = %s AND line > %s", [batch_id, after_line]
        if ok is not None:
            where += " AND ok = %s"
            args.append(bool(ok))
        bounded = within_bytes(conn, "batch_results", "line", "octet_length(data)", where, args, limit, max_bytes, "%s")
        if bounded is None:
            return []
        where, args = bounded
        rows = conn.execute(f"SELECT line, custom_id, ok, data FROM batch_results WHERE {where} ORDER BY line "
                            "LIMIT %s", (*args, limit)).fetchall()
        return [(r[0], r[1], bool(r[2]), bytes(r[3])) for r in rows]

    def drop_file_results(self, file_id, kind=None):
        return self._db.run(self._drop_file_results, file_id, kind)

    @staticmethod
    def _drop_file_results(conn, file_id, kind):
        with conn.transaction():
            return drop_file_results(conn, file_id, kind, _FILE_RESULTS)

    def finalize(self, batch_id, changes, files, only_if_status=None, token=None):
        return self._db.run(self._finalize, batch_id, dict(changes), dict(files), only_if_status, token,
                            int(self._db.now()))

    @staticmethod
    def _finalize(conn, batch_id, changes, files, only_if_status, token, now):
        ids = {kind: (files.get(kind) or (None, 0))[0] for kind in ("output", "error")}
        with conn.transaction():
            if not _apply(conn, batch_id, dict(changes, output_file_id=ids["output"], error_file_id=ids["error"]),
                          only_if_status, token):
                return None
            tenant, expiry = conn.execute("SELECT tenant, output_expires_after FROM batches WHERE id = %s",
                                          (batch_id,)).fetchone()
            for kind in ("output", "error"):  # the batch's tenant owns its output
                if files.get(kind) is not None:
                    file_id, size = files[kind]
                    insert_file(conn, file_id, size, now, f"{batch_id}_{kind}.jsonl", "batch_output", tenant,
                                None if expiry is None else now + expiry)
            conn.execute("DELETE FROM batch_requests WHERE batch_id = %s", (batch_id,))
        return _get(conn, batch_id)


def _get(conn, batch_id):
    row = conn.cursor(row_factory=dict_row).execute(f"{_SELECT} WHERE id = %s", (batch_id,)).fetchone()
    return _decode(row) if row is not None else None


def _fence(conn, batch_id, token):
    """Lock the batch row and check the claim token (a claim elsewhere waits for this transaction)."""
    row = conn.execute("SELECT claim_token FROM batches WHERE id = %s FOR UPDATE", (batch_id,)).fetchone()
    if row is None or row[0] != token:
        raise LeaseLost(f"batch {batch_id}: claim token {token} is stale")


def _apply(conn, batch_id, changes, only_if_status, token):
    values = _encode(changes)
    sql = f"UPDATE batches SET {', '.join(f'{k} = %s' for k in values)} WHERE id = %s"
    args = [*values.values(), batch_id]
    if only_if_status:
        sql += " AND status = ANY(%s)"
        args.append(list(only_if_status))
    if token is not None:
        sql += " AND claim_token = %s"
        args.append(token)
    return conn.execute(sql, args).rowcount > 0


def _encode(batch):
    return encode_record(batch, BATCH_COLUMNS, _JSON)


def _decode(batch):
    return decode_json(batch, _JSON)
