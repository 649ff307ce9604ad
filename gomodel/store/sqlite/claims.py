"""L{IClaims} on SQLite: named leases with fencing tokens, for singleton duties.

The claim is one upsert that only takes a free, expired or own lease; in
PostgreSQL the same statement works as it is (C{ON CONFLICT ... DO UPDATE
... WHERE}).
"""

from zope.interface import implementer

from gomodel.store.interfaces import IClaims


@implementer(IClaims)
class SQLiteClaims:
    """Leases in the C{claims} table."""

    def __init__(self, db):
        self._db = db

    def claim(self, name, owner, lease):
        return self._db.run(self._claim, name, owner, self._db.now(), lease)

    def _claim(self, name, owner, now, lease):
        with self._db.transaction() as conn:
            taken = conn.execute(
                "INSERT INTO claims (name, owner, lease_until, token) VALUES (?, ?, ?, 1) "
                "ON CONFLICT (name) DO UPDATE SET owner = excluded.owner, lease_until = excluded.lease_until, "
                "token = claims.token + 1 "
                "WHERE claims.owner IS NULL OR claims.owner = excluded.owner OR claims.lease_until < ?",
                (name, owner, now + lease, now)).rowcount
            if not taken:
                return None
            return conn.execute("SELECT token FROM claims WHERE name = ?", (name,)).fetchone()[0]

    def renew(self, name, owner, token, lease):
        return self._db.run(self._renew, name, owner, token, self._db.now() + lease)

    def _renew(self, name, owner, token, until):
        with self._db.transaction() as conn:
            return conn.execute("UPDATE claims SET lease_until = ? WHERE name = ? AND owner = ? AND token = ?",
                                (until, name, owner, token)).rowcount > 0

    def release(self, name, owner, token):
        return self._db.run(self._release, name, owner, token)

    def _release(self, name, owner, token):
        with self._db.transaction() as conn:
            conn.execute("UPDATE claims SET owner = NULL, lease_until = NULL WHERE name = ? AND owner = ? "
                         "AND token = ?", (name, owner, token))
