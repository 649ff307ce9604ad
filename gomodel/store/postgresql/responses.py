"""L{IResponseStore} on PostgreSQL: responses created through the gateway, with their replica and tenant.

Any host finds a stored response and the replica that made it, so a
C{previous_response_id} follow-up reaches that replica whichever host it
lands on. A response is kept without waiting for the write (L{keep}): it waits up
to L{KEEP_DELAY} seconds for others, and those kept meanwhile are written
in one transaction. So a client may send its follow-up to another host
before the write is committed: a read that finds nothing looks again a few
times within C{MISS_GRACE} seconds (on the reactor's clock, holding no
connection). In this process, reads and writes asked for after a keep wait
for its write.
"""

import json

from psycopg import InterfaceError, OperationalError
from psycopg.rows import dict_row
from twisted.internet.defer import Deferred, DeferredList
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from gomodel import jsonutil
from gomodel.errors import StorageUnavailable
from gomodel.logs import FailureStreak
from gomodel.store.codec import RESPONSE_COLUMNS, chain_query, follows_deleted_query, response_row, response_upsert
from gomodel.store.held import Held, looked_again
from gomodel.store.interfaces import KEEP_DELAY, IResponseStore
from gomodel.store.postgresql.database import in_batches

MISS_GRACE = (0.02, 0.05, 0.1, 0.2)  # waits before a missing response is looked up again
_PUT = response_upsert("%s")
_UPDATE = "UPDATE responses SET status = %s, response = %s WHERE id = %s AND tenant IS NOT DISTINCT FROM %s"
_FOLLOWS_DELETED = follows_deleted_query("%s")
_CHAIN = chain_query("%s")


@implementer(IResponseStore)
class PostgreSQLResponseStore:
    """Stored responses in the C{responses} table."""

    log = Logger()

    def __init__(self, db, clock):
        """
        @param clock: an C{IReactorTime}: when kept responses are written, and the waits of a read
            that found nothing.
        """
        self._db = db
        self._clock = clock
        self._kept = Held(clock, KEEP_DELAY, self._hand_over)
        self._keeping = set()  # writes of kept records in flight: later reads and writes wait for them
        self._outage = FailureStreak(self, "storing responses failed; they are not kept",
                                     "responses are stored again ({lost} were not stored meanwhile)")

    def _after_keeps(self, f, *args):
        """Run C{f(conn, *args)} once the kept writes asked for before are done (as SQLite's one thread does)."""
        self.flush()
        if not self._keeping:
            return self._db.run(f, *args)
        d = DeferredList(list(self._keeping), consumeErrors=True)
        d.addCallback(lambda _: self._db.run(f, *args))
        return d

    def put(self, record):
        return self._after_keeps(self._put, dict(record))

    def keep(self, record):
        self._kept.add(dict(record))

    def flush(self):
        """Hand the records kept so far to a store thread, to be written in one transaction."""
        self._kept.flush()

    def _hand_over(self, records):
        d = self._db.run(self._put_all, records)
        self._keeping.add(d)
        d.addCallbacks(self._written, self._not_written, errbackArgs=(records,))
        d.addBoth(lambda _: self._keeping.discard(d))

    def written(self):
        """Hand over the records kept so far (L{flush}).

        @return: a Deferred firing with None once every write of kept records is done (it never fails).
        """
        self.flush()
        d = DeferredList(list(self._keeping), consumeErrors=True)
        d.addCallback(lambda _: None)
        return d

    def _written(self, failures):
        self._outage.succeeded()
        for response_id, failure in failures:
            self.log.failure("storing response {id} failed", failure, id=response_id)

    def _not_written(self, failure, records):
        """The write of C{records} failed: while the database is unavailable, a warning once an outage (with
        the number lost when it ends; each id at debug), else each record's failure in full."""
        if not failure.check(StorageUnavailable):
            for record in records:
                self.log.failure("storing response {id} failed", failure, id=record["id"])
            return
        self._outage.failed(failure, len(records))
        for record in records:
            self.log.debug("response {id} not stored: {error}", id=record["id"], error=failure.value.message)

    @classmethod
    def _put_all(cls, conn, records):
        """In a store thread: write C{records} in one transaction; when that fails, each in its own.

        @return: C{[(id, Failure)]} of the records that could not be written.
        @raise psycopg.OperationalError: the server could not be reached (nothing more is tried).
        """
        if len(records) > 1:
            try:
                rows = [response_row(record) for record in records]
                with conn.transaction():
                    conn.cursor().executemany(_PUT, rows)
                return []
            except (OperationalError, InterfaceError):
                raise
            except Exception:
                pass  # one by one: one bad record loses no other
        failed = []
        for record in records:
            try:
                cls._put(conn, record)
            except (OperationalError, InterfaceError):
                raise
            except Exception:
                failed.append((record["id"], Failure()))
        return failed

    @staticmethod
    def _put(conn, record):
        conn.execute(_PUT, response_row(record))

    def get(self, response_id):
        return Deferred.fromCoroutine(self._get_or_wait(response_id))

    async def _get_or_wait(self, response_id):
        return await looked_again(await self._after_keeps(self._get, response_id),
                                  lambda: self._db.run(self._get, response_id), self._clock, MISS_GRACE)

    @staticmethod
    def _get(conn, response_id):
        record = conn.cursor(row_factory=dict_row).execute(
            f"SELECT {RESPONSE_COLUMNS} FROM responses WHERE id = %s", (response_id,)).fetchone()
        return None if record is None else _decoded(record)

    def chain(self, response_id):
        return self._after_keeps(self._chain, response_id)

    @staticmethod
    def _chain(conn, response_id):
        return [_decoded(record) for record in conn.cursor(row_factory=dict_row).execute(_CHAIN, (response_id,))]

    def update(self, response_id, status, response, tenant=None):
        text = jsonutil.dumps(response).decode("utf-8")
        return self._after_keeps(lambda conn: conn.execute(_UPDATE, (status, text, response_id, tenant)).rowcount > 0)

    def note_streamed(self, response_id, streamed):
        return self._after_keeps(lambda conn: conn.execute(
            "UPDATE responses SET streamed = %s WHERE id = %s AND streamed IS NULL", (streamed, response_id)
        ).rowcount > 0)

    def delete(self, response_id):
        return self._after_keeps(self._delete, response_id, int(self._clock.seconds()))

    @staticmethod
    def _delete(conn, response_id, now):
        with conn.transaction():
            if conn.execute("DELETE FROM responses WHERE id = %s", (response_id,)).rowcount == 0:
                return False
            conn.execute("INSERT INTO deleted_responses (id, deleted_at) VALUES (%s, %s) "
                         "ON CONFLICT (id) DO UPDATE SET deleted_at = EXCLUDED.deleted_at", (response_id, now))
            return True

    def deleted(self, response_id):
        return self._after_keeps(lambda conn: conn.execute("SELECT 1 FROM deleted_responses WHERE id = %s",
                                                           (response_id,)).fetchone() is not None)

    def follows_deleted(self, response_id):
        return self._after_keeps(lambda conn: conn.execute(_FOLLOWS_DELETED, (response_id,)).fetchone() is not None)

    def delete_before(self, created_at):
        return Deferred.fromCoroutine(self._delete_before(created_at))

    async def _delete_before(self, created_at):
        await in_batches(self._after_keeps, self._forget_deleted, created_at)
        await in_batches(self._after_keeps, self._forget_swept, created_at)
        return await in_batches(self._after_keeps, self._delete_batch, created_at, int(self._clock.seconds()))

    @staticmethod
    def _forget_deleted(conn, created_at, most):
        return conn.execute("DELETE FROM deleted_responses WHERE id IN (SELECT id FROM deleted_responses "
                            "WHERE deleted_at < %s LIMIT %s)", (created_at, most)).rowcount

    @staticmethod
    def _forget_swept(conn, created_at, most):
        return conn.execute("DELETE FROM swept_responses WHERE id IN (SELECT id FROM swept_responses "
                            "WHERE swept_at < %s LIMIT %s)", (created_at, most)).rowcount

    @staticmethod
    def _delete_batch(conn, created_at, now, most):
        """Sweep at most C{most} responses created before C{created_at}, each remembered as swept (L{swept})."""
        return conn.execute(
            "WITH gone AS (DELETE FROM responses WHERE id IN (SELECT id FROM responses WHERE created_at < %s "
            "LIMIT %s) RETURNING id, tenant), kept AS (INSERT INTO swept_responses (id, tenant, swept_at) "
            "SELECT id, tenant, %s FROM gone ON CONFLICT (id) DO UPDATE SET tenant = EXCLUDED.tenant, "
            "swept_at = EXCLUDED.swept_at) SELECT count(*) FROM gone", (created_at, most, now)).fetchone()[0]

    def swept(self, response_id):
        return self._after_keeps(self._swept, response_id)

    @staticmethod
    def _swept(conn, response_id):
        row = conn.execute("SELECT id, tenant FROM swept_responses WHERE id = %s", (response_id,)).fetchone()
        return None if row is None else {"id": row[0], "tenant": row[1]}


def _decoded(record) -> dict:
    """C{record}, a C{responses} row as a dict, with its JSON columns decoded."""
    record["input_items"] = json.loads(record["input_items"])
    record["response"] = json.loads(record["response"])
    return record
