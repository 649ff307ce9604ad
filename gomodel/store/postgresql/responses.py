"""L{IResponseStore} on PostgreSQL: responses created through the gateway, with their replica and tenant.

Any host finds a stored response and the replica that made it, so a
C{previous_response_id} follow-up reaches that replica whichever host it
lands on. A response is kept without waiting for the write (L{keep}), so
a client may send its follow-up to another host before the write is
committed: a read that finds nothing looks again a few times within
C{MISS_GRACE} seconds (on the reactor's clock, holding no connection).
"""

import json

from psycopg.rows import dict_row
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.task import deferLater
from twisted.logger import Logger
from zope.interface import implementer

from gomodel import jsonutil
from gomodel.errors import StorageUnavailable
from gomodel.store.interfaces import IResponseStore

MISS_GRACE = (0.02, 0.05, 0.1, 0.2)  # waits before a missing response is looked up again
_COLUMNS = "id, provider, replica, created_at, previous_response_id, status, input_items, response, tenant"


@implementer(IResponseStore)
class PostgreSQLResponseStore:
    """Stored responses in the C{responses} table."""

    log = Logger()

    def __init__(self, db, clock):
        """
        @param clock: an C{IReactorTime} for the waits of a read that found nothing.
        """
        self._db = db
        self._clock = clock
        self._keeping = set()  # writes of keep() in flight: later reads and writes wait for them

    def _after_keeps(self, f, *args):
        """Run C{f(conn, *args)} once the kept writes asked for before are done (as SQLite's one thread does)."""
        if not self._keeping:
            return self._db.run(f, *args)
        d = DeferredList(list(self._keeping), consumeErrors=True)
        d.addCallback(lambda _: self._db.run(f, *args))
        return d

    def put(self, record):
        return self._after_keeps(self._put, dict(record))

    def keep(self, record):
        d = self._db.run(self._put, dict(record))
        self._keeping.add(d)

        def failed(failure):
            if failure.check(StorageUnavailable):
                self.log.warn("response {id} not stored: {error}", id=record["id"], error=failure.value.message)
            else:
                self.log.failure("storing response {id} failed", failure, id=record["id"])

        d.addErrback(failed)
        d.addBoth(lambda _: self._keeping.discard(d))

    @staticmethod
    def _put(conn, record):
        raw = record.get("response_json")
        values = (record["id"], record["provider"], record.get("replica"), record["created_at"],
                  record.get("previous_response_id"),
                  record.get("status"), jsonutil.dumps(record["input_items"]).decode("utf-8"),
                  raw.decode("utf-8") if raw is not None else jsonutil.dumps(record["response"]).decode("utf-8"),
                  record.get("tenant"))
        conn.execute(
            f"INSERT INTO responses ({_COLUMNS}) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s) "
            "ON CONFLICT (id) DO UPDATE SET provider = excluded.provider, replica = excluded.replica, "
            "created_at = excluded.created_at, previous_response_id = excluded.previous_response_id, "
            "status = excluded.status, input_items = excluded.input_items, response = excluded.response", values)

    def get(self, response_id):
        return Deferred.fromCoroutine(self._get_or_wait(response_id))

    async def _get_or_wait(self, response_id):
        record = await self._after_keeps(self._get, response_id)
        for wait in MISS_GRACE:
            if record is not None:
                break
            await deferLater(self._clock, wait, lambda: None)  # another host may be committing it
            record = await self._db.run(self._get, response_id)
        return record

    @staticmethod
    def _get(conn, response_id):
        record = conn.cursor(row_factory=dict_row).execute(
            f"SELECT {_COLUMNS} FROM responses WHERE id = %s", (response_id,)).fetchone()
        if record is None:
            return None
        record["input_items"] = json.loads(record["input_items"])
        record["response"] = json.loads(record["response"])
        return record

    def delete(self, response_id):
        return self._after_keeps(lambda conn: conn.execute("DELETE FROM responses WHERE id = %s",
                                                           (response_id,)).rowcount > 0)

    def delete_before(self, created_at):
        return self._after_keeps(lambda conn: conn.execute("DELETE FROM responses WHERE created_at < %s",
                                                           (created_at,)).rowcount)
