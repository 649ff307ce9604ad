"""L{IClaims} on PostgreSQL: named leases with fencing tokens, for singleton duties.

The claim is one upsert that only takes a free, expired or own lease
(C{ON CONFLICT ... DO UPDATE ... WHERE}); the row lock it takes makes
concurrent claimers on other hosts wait for it and then see it held.
"""

from zope.interface import implementer

from gomodel.store.interfaces import IClaims


@implementer(IClaims)
class PostgreSQLClaims:
    """Leases in the C{claims} table."""

    def __init__(self, db):
        self._db = db

    def claim(self, name, owner, lease):
        return self._db.run(self._claim, name, owner, self._db.now(), lease)

    @staticmethod
    def _claim(conn, name, owner, now, lease):
        row = conn.execute(
            "INSERT INTO claims (name, owner, lease_until, token) VALUES (%s, %s, %s, 1) "
            "ON CONFLICT (name) DO UPDATE SET owner = excluded.owner, lease_until = excluded.lease_until, "
            "token = claims.token + 1 "
            "WHERE claims.owner IS NULL OR claims.owner = excluded.owner OR claims.lease_until < %s "
            "RETURNING token", (name, owner, now + lease, now)).fetchone()
        return row[0] if row is not None else None

    def renew(self, name, owner, token, lease):
        return self._db.run(self._renew, name, owner, token, self._db.now() + lease)

    @staticmethod
    def _renew(conn, name, owner, token, until):
        return conn.execute("UPDATE claims SET lease_until = %s WHERE name = %s AND owner = %s AND token = %s",
                            (until, name, owner, token)).rowcount > 0

    def release(self, name, owner, token):
        return self._db.run(self._release, name, owner, token)

    @staticmethod
    def _release(conn, name, owner, token):
        conn.execute("UPDATE claims SET owner = NULL, lease_until = NULL WHERE name = %s AND owner = %s "
                     "AND token = %s", (name, owner, token))
