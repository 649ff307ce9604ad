"""L{IFileStore} on SQLite: file metadata (contents are blobs, see L{gomodel.store.sqlite.blobs})."""

from zope.interface import implementer

from gomodel.store.interfaces import IFileStore
from gomodel.store.sqlite.rows import marks

FILE_COLUMNS = ("id", "bytes", "created_at", "filename", "purpose", "status", "expires_at", "tenant")
_SELECT = f"SELECT {', '.join(FILE_COLUMNS)} FROM files"


def insert_file(conn, file_id, size, now, filename, purpose, tenant=None):
    """Insert one file record (also used by a batch's finalize, in its transaction)."""
    conn.execute("INSERT INTO files (id, bytes, created_at, filename, purpose, tenant) VALUES (?, ?, ?, ?, ?, ?)",
                 (file_id, size, now, filename, purpose, tenant))


@implementer(IFileStore)
class SQLiteFileStore:
    """File records in the C{files} table."""

    def __init__(self, db):
        self._db = db

    def add(self, file_id, size, filename, purpose, tenant=None):
        return self._db.run(self._add, file_id, size, filename, purpose, int(self._db.now()), tenant)

    def _add(self, file_id, size, filename, purpose, now, tenant):
        with self._db.transaction() as conn:
            insert_file(conn, file_id, size, now, filename, purpose, tenant)
        return self._get(file_id)

    def get(self, file_id):
        return self._db.run(self._get, file_id)

    def _get(self, file_id):
        row = self._db.conn().execute(f"{_SELECT} WHERE id = ?", (file_id,)).fetchone()
        return dict(row) if row is not None else None

    def list(self, purpose=None, after=None, limit=10000, order="desc", tenant=None):
        return self._db.run(self._list, purpose, after, limit, order, tenant)

    def _list(self, purpose, after, limit, order, tenant):
        conn = self._db.conn()
        where, args = [], []
        if tenant is not None:
            where.append("tenant = ?")
            args.append(tenant)
        if purpose is not None:
            where.append("purpose = ?")
            args.append(purpose)
        if after is not None:
            # (an item of this listing: another tenant's id is as unknown)
            row = conn.execute(f"SELECT seq FROM files WHERE {' AND '.join(['id = ?', *where])}",
                               (after, *args)).fetchone()
            if row is None:
                return [], False
            where.append("seq < ?" if order == "desc" else "seq > ?")
            args.append(row[0])
        direction = "DESC" if order == "desc" else "ASC"
        sql = f"{_SELECT}{' WHERE ' + ' AND '.join(where) if where else ''} ORDER BY seq {direction} LIMIT ?"
        rows = conn.execute(sql, (*args, limit + 1)).fetchall()
        return [dict(r) for r in rows[:limit]], len(rows) > limit

    def delete(self, file_id):
        return self._db.run(self._delete, file_id)

    def _delete(self, file_id):
        with self._db.transaction() as conn:
            return conn.execute("DELETE FROM files WHERE id = ?", (file_id,)).rowcount > 0

    def known(self, file_ids):
        return self._db.run(self._known, list(file_ids))

    def _known(self, file_ids):
        conn, found = self._db.conn(), set()
        for start in range(0, len(file_ids), 500):
            chunk = file_ids[start:start + 500]
            found.update(r[0] for r in conn.execute(f"SELECT id FROM files WHERE id IN ({marks(chunk)})", chunk))
        return found
