"""L{IBackgroundWatches} on PostgreSQL (the statements are the backends' shared ones, L{watch_statements})."""

from zope.interface import implementer

from gomodel.store.codec import watch_of_row, watch_row, watch_statements
from gomodel.store.interfaces import IBackgroundWatches

_SQL = watch_statements("%s")


@implementer(IBackgroundWatches)
class PostgreSQLBackgroundWatches:
    """Watches in the C{background_watches} table."""

    def __init__(self, db):
        self._db = db

    def add(self, watch, owner, lease):
        return self._db.run(_write, _SQL["add"], watch_row(watch, owner, self._db.now() + lease))

    def renew(self, owner, lease):
        return self._db.run(_write, _SQL["renew"], (self._db.now() + lease, owner))

    def release(self, owner):
        return self._db.run(_write, _SQL["release"], (owner,))

    def settle(self, response_id):
        return self._db.run(_write, _SQL["settle"], (response_id,))

    def adopt(self, owner, lease, limit=100):
        now = self._db.now()
        return self._db.run(_adopt, (owner, now + lease, now, now, limit))


def _write(conn, statement, values):
    return conn.execute(statement, values).rowcount > 0


def _adopt(conn, values):
    return [watch_of_row(row) for row in conn.execute(_SQL["adopt"], values).fetchall()]
