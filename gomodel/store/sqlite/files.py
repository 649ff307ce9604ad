"""L{IFileStore} on SQLite: file metadata (contents are blobs, see L{gomodel.store.sqlite.blobs})."""

from zope.interface import implementer

from gomodel.store.interfaces import KEEP_DELETED, IFileStore
from gomodel.store.records import tenant_list
from gomodel.store.sqlite.rows import marks

FILE_COLUMNS = ("id", "bytes", "created_at", "filename", "purpose", "status", "expires_at", "tenant")
_SELECT = f"SELECT {', '.join(FILE_COLUMNS)} FROM files"


# A file past its expires_at is gone for every reader before the sweep deletes it.
_LIVE = "(expires_at IS NULL OR expires_at > ?)"


def insert_file(conn, file_id, size, now, filename, purpose, tenant=None, expires_at=None):
    """Insert one file record (also used by a batch's finalize, in its transaction)."""
    conn.execute("INSERT INTO files (id, bytes, created_at, filename, purpose, tenant, expires_at) "
                 "VALUES (?, ?, ?, ?, ?, ?, ?)", (file_id, size, now, filename, purpose, tenant, expires_at))


@implementer(IFileStore)
class SQLiteFileStore:
    """File records in the C{files} table."""

    def __init__(self, db):
        self._db = db

    def add(self, file_id, size, filename, purpose, tenant=None, expires_after=None):
        now = int(self._db.now())
        return self._db.run(self._add, file_id, size, filename, purpose, now, tenant,
                            None if expires_after is None else now + expires_after)

    def _add(self, file_id, size, filename, purpose, now, tenant, expires_at):
        with self._db.transaction() as conn:
            insert_file(conn, file_id, size, now, filename, purpose, tenant, expires_at)
        return self._get(file_id, now)

    def get(self, file_id):
        return self._db.run(self._get, file_id, int(self._db.now()))

    def _get(self, file_id, now):
        row = self._db.conn().execute(f"{_SELECT} WHERE id = ? AND {_LIVE}", (file_id, now)).fetchone()
        return dict(row) if row is not None else None

    def list(self, purpose=None, after=None, limit=10000, order="desc", tenant=None, hide=()):
        return self._db.run(self._list, purpose, after, limit, order, tenant, tuple(hide), int(self._db.now()))

    def _list(self, purpose, after, limit, order, tenant, hide, now):
        conn = self._db.conn()
        where, args = [_LIVE], [now]
        tenants = tenant_list(tenant)
        if tenants:
            where.append(f"tenant IN ({marks(tenants)})")
            args.extend(tenants)
        if after is not None:
            # The cursor is a file this key may see or saw, of any purpose: its place in the order is where
            # the page starts (OpenAI's cursor), also once it expired or was deleted (a client deleting the
            # files it pages through). Another tenant's id is as unknown.
            mine, whose = ("", ()) if not tenants else (f" AND tenant IN ({marks(tenants)})", tenants)
            row = conn.execute(f"SELECT seq FROM files WHERE id = ?{mine} "
                               f"UNION ALL SELECT seq FROM deleted_files WHERE id = ?{mine}",
                               (after, *whose, after, *whose)).fetchone()
            if row is None:
                return [], False
            where.append("seq < ?" if order == "desc" else "seq > ?")
            args.append(row[0])
        if purpose is not None:
            where.append("purpose = ?")
            args.append(purpose)
        if hide:
            where.append(f"purpose NOT IN ({marks(hide)})")
            args.extend(hide)
        direction = "DESC" if order == "desc" else "ASC"
        sql = f"{_SELECT}{' WHERE ' + ' AND '.join(where) if where else ''} ORDER BY seq {direction} LIMIT ?"
        rows = conn.execute(sql, (*args, limit + 1)).fetchall()
        return [dict(r) for r in rows[:limit]], len(rows) > limit

    def delete(self, file_id):
        return self._db.run(self._delete, file_id, int(self._db.now()))

    def _delete(self, file_id, now):
        with self._db.transaction() as conn:
            gone = conn.execute("DELETE FROM files WHERE id = ? RETURNING seq, tenant", (file_id,)).fetchone()
            if gone is None:
                return False
            conn.execute("DELETE FROM deleted_files WHERE deleted_at < ?", (now - KEEP_DELETED,))
            conn.execute("INSERT OR REPLACE INTO deleted_files (id, seq, tenant, deleted_at) VALUES (?, ?, ?, ?)",
                         (file_id, *gone, now))
        return True

    def expired(self, limit=1000):
        return self._db.run(self._expired, int(self._db.now()), limit)

    def _expired(self, now, limit):
        rows = self._db.conn().execute("SELECT id FROM files WHERE expires_at <= ? LIMIT ?", (now, limit))
        return [row[0] for row in rows]

    def known(self, file_ids):
        return self._db.run(self._known, list(file_ids))

    def _known(self, file_ids):
        conn, found = self._db.conn(), set()
        for start in range(0, len(file_ids), 500):
            chunk = file_ids[start:start + 500]
            found.update(r[0] for r in conn.execute(f"SELECT id FROM files WHERE id IN ({marks(chunk)})", chunk))
        return found
