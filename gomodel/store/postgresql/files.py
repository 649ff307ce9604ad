"""L{IFileStore} on PostgreSQL: file metadata (contents are blobs, see L{gomodel.store.postgresql.blobs})."""

from psycopg.rows import dict_row
from zope.interface import implementer

from gomodel.store.interfaces import KEEP_DELETED, IFileStore
from gomodel.store.records import tenant_list

FILE_COLUMNS = ("id", "bytes", "created_at", "filename", "purpose", "status", "expires_at", "tenant")
_SELECT = f"SELECT {', '.join(FILE_COLUMNS)} FROM files"


# A file past its expires_at is gone for every reader before the sweep deletes it.
_LIVE = "(expires_at IS NULL OR expires_at > %s)"


def insert_file(conn, file_id, size, now, filename, purpose, tenant=None, expires_at=None):
    """Insert one file record (also used by a batch's finalize, in its transaction)."""
    conn.execute("INSERT INTO files (id, bytes, created_at, filename, purpose, tenant, expires_at) "
                 "VALUES (%s, %s, %s, %s, %s, %s, %s)", (file_id, size, now, filename, purpose, tenant, expires_at))


def get_file(conn, file_id, now):
    """The record of C{file_id} (unless it expired by C{now}), or None."""
    return conn.cursor(row_factory=dict_row).execute(f"{_SELECT} WHERE id = %s AND {_LIVE}",
                                                     (file_id, now)).fetchone()


@implementer(IFileStore)
class PostgreSQLFileStore:
    """File records in the C{files} table."""

    def __init__(self, db):
        self._db = db

    def add(self, file_id, size, filename, purpose, tenant=None, expires_after=None):
        now = int(self._db.now())
        return self._db.run(self._add, file_id, size, filename, purpose, now, tenant,
                            None if expires_after is None else now + expires_after)

    @staticmethod
    def _add(conn, file_id, size, filename, purpose, now, tenant, expires_at):
        with conn.transaction():
            insert_file(conn, file_id, size, now, filename, purpose, tenant, expires_at)
        return get_file(conn, file_id, now)

    def get(self, file_id):
        return self._db.run(get_file, file_id, int(self._db.now()))

    def list(self, purpose=None, after=None, limit=10000, order="desc", tenant=None, hide=()):
        return self._db.run(self._list, purpose, after, limit, order, tenant, tuple(hide), int(self._db.now()))

    @staticmethod
    def _list(conn, purpose, after, limit, order, tenant, hide, now):
        where, args = [_LIVE], [now]
        tenants = tenant_list(tenant)
        if tenants:
            where.append("tenant = ANY(%s)")
            args.append(tenants)
        if after is not None:
            # The cursor is a file this key may see or saw, of any purpose: its place in the order is where
            # the page starts (OpenAI's cursor), also once it expired or was deleted (a client deleting the
            # files it pages through). Another tenant's id is as unknown.
            mine, whose = ("", ()) if not tenants else (" AND tenant = ANY(%s)", (tenants,))
            row = conn.execute(f"SELECT seq FROM files WHERE id = %s{mine} "
                               f"UNION ALL SELECT seq FROM deleted_files WHERE id = %s{mine}",
                               (after, *whose, after, *whose)).fetchone()
            if row is None:
                return [], False
            where.append("seq < %s" if order == "desc" else "seq > %s")
            args.append(row[0])
        if purpose is not None:
            where.append("purpose = %s")
            args.append(purpose)
        if hide:
            where.append("purpose <> ALL(%s)")
            args.append(list(hide))
        direction = "DESC" if order == "desc" else "ASC"
        sql = f"{_SELECT}{' WHERE ' + ' AND '.join(where) if where else ''} ORDER BY seq {direction} LIMIT %s"
        rows = conn.cursor(row_factory=dict_row).execute(sql, (*args, limit + 1)).fetchall()
        return rows[:limit], len(rows) > limit

    def delete(self, file_id):
        return self._db.run(self._delete, file_id, int(self._db.now()))

    @staticmethod
    def _delete(conn, file_id, now):
        with conn.transaction():
            gone = conn.execute("DELETE FROM files WHERE id = %s RETURNING seq, tenant", (file_id,)).fetchone()
            if gone is None:
                return False
            conn.execute("DELETE FROM deleted_files WHERE deleted_at < %s", (now - KEEP_DELETED,))
            conn.execute("INSERT INTO deleted_files (id, seq, tenant, deleted_at) VALUES (%s, %s, %s, %s) "
                         "ON CONFLICT (id) DO UPDATE SET seq = excluded.seq, tenant = excluded.tenant, "
                         "deleted_at = excluded.deleted_at", (file_id, *gone, now))
        return True

    def expired(self, limit=1000):
        return self._db.run(self._expired, int(self._db.now()), limit)

    @staticmethod
    def _expired(conn, now, limit):
        return [r[0] for r in conn.execute("SELECT id FROM files WHERE expires_at <= %s LIMIT %s", (now, limit))]

    def known(self, file_ids):
        return self._db.run(self._known, list(file_ids))

    @staticmethod
    def _known(conn, file_ids):
        return {r[0] for r in conn.execute("SELECT id FROM files WHERE id = ANY(%s)", (file_ids,))}
